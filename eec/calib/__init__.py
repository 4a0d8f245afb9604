"""Confidence metrics and threshold rules; numpy only.

The compiled exit heads compute the confidence in their graphs; the numpy
versions here define what those graphs must compute (tests hold them to it)
and are what calibration traces are scored with.
"""

from eec.calib.metrics import METRICS, entropy, max_probability, softmax, top2_margin
from eec.calib.thresholds import cascade_thresholds, risk_controlled_threshold, valade_threshold

__all__ = [
    "METRICS",
    "cascade_thresholds",
    "entropy",
    "max_probability",
    "risk_controlled_threshold",
    "softmax",
    "top2_margin",
    "valade_threshold",
]
