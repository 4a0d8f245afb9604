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


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of consecutive exits' hidden states (CALM's state propagation)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-12)


METRICS = {"top2-margin": top2_margin, "max-prob": max_probability, "neg-entropy": entropy}
# The columns of an exit head graph's `scores` output, in order.
GRAPH_METRICS = ("top2-margin", "max-prob", "neg-entropy")
# What the runtime can threshold on: the graph's scores, then the host-side cosine
# between this exit's hidden state and the previous exit's (none before the first exit),
# then a learned exit classifier's probability that the exit agrees with the final head,
# computed inside the segment (only in artifacts compiled with --exit-classifier).
ALL_METRICS = (*GRAPH_METRICS, "cosine", "classifier")
CLASSIFIER = ALL_METRICS.index("classifier")
COSINE = ALL_METRICS.index("cosine")
