"""Confidence metrics and threshold rules; numpy only.

The compiled exit heads compute the confidence in their graphs; the numpy
versions here define what those graphs must compute (tests hold them to it)
and are what calibration traces are scored with.
"""

from eec.calib.metrics import METRICS, entropy, max_probability, softmax, top2_margin

__all__ = ["METRICS", "entropy", "max_probability", "softmax", "top2_margin"]
