"""Confidence metrics over an exit's logits, higher = more confident (numpy only)."""

from __future__ import annotations

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def top2_margin(logits: np.ndarray) -> np.ndarray:
    """Top-1 minus top-2 probability ("breaking ties"); the heads' default metric."""
    p = np.sort(softmax(logits), axis=-1)
    return p[..., -1] - p[..., -2]


def max_probability(logits: np.ndarray) -> np.ndarray:
    return softmax(logits).max(axis=-1)


def entropy(logits: np.ndarray) -> np.ndarray:
    """Negative Shannon entropy (nats), so that higher means more confident like the others."""
    p = softmax(logits)
    return (p * np.log(np.clip(p, 1e-300, None))).sum(axis=-1)


METRICS = {"top2-margin": top2_margin, "max-prob": max_probability, "neg-entropy": entropy}
