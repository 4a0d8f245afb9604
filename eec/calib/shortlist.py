"""Vocabulary shortlists for exit heads, and exits rescored as if their heads had one. numpy only.

A shortlist head projects onto K token rows instead of the whole vocabulary
(HCN's shortlist, for decoders): its cost falls by V/K, and it can only ever
emit a shortlisted token, so a token whose final prediction lies outside the
list never agrees at that exit and calibration keeps it from exiting there.

Rules:
1. The list is the K most frequent final-head tokens of the calibration
   generations, topped up with the lowest unseen ids (byte-pair vocabularies
   give frequent merges low ids), sorted.
2. `rescore` replays an exit's head on the hidden states the traces stored
   (RMSNorm, the shortlisted rows, softmax), recomputing the three graph
   metrics and agreement; the cosine column does not depend on the head and
   is kept. The compiled artifact is recalibrated afterwards from its own
   graphs, so this is only for choosing K.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from eec.calib.traces import Traces


@dataclass
class HeadWeights:
    """An exit head as numpy arrays: RMSNorm weight and epsilon, projection [vocab, hidden], bias or None."""

    norm: np.ndarray
    eps: float
    proj: np.ndarray
    bias: np.ndarray | None = None


def shortlist_ids(final_tokens: np.ndarray, k: int, vocab_size: int) -> np.ndarray:
    if not 0 < k <= vocab_size:
        raise ValueError(f"shortlist size must be in 1..{vocab_size}, got {k}")
    counts = np.bincount(np.asarray(final_tokens, dtype=np.int64), minlength=vocab_size)
    seen = np.flatnonzero(counts)
    ranked = seen[np.argsort(-counts[seen], kind="stable")][:k]
    rest = np.setdiff1d(np.arange(vocab_size), ranked, assume_unique=True)[: k - len(ranked)]
    return np.sort(np.concatenate([ranked, rest])).astype(np.int64)


def head_scores(head: HeadWeights, hidden: np.ndarray, ids: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Token and [n, 3] graph metrics (top-2 margin, max prob, negative entropy) for hidden [n, h]."""
    h = hidden.astype(np.float32)
    normed = head.norm * (h / np.sqrt((h * h).mean(-1, keepdims=True) + head.eps))
    proj = head.proj if ids is None else head.proj[ids]
    logits = normed @ proj.T
    if head.bias is not None:
        logits = logits + (head.bias if ids is None else head.bias[ids])
    logits -= logits.max(-1, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(-1, keepdims=True)
    top2 = np.sort(np.partition(probs, -2, axis=-1)[:, -2:], axis=-1)
    neg_entropy = (probs * np.log(np.maximum(probs, 1e-30))).sum(-1)
    index = probs.argmax(-1)
    token = index if ids is None else ids[index]
    return token, np.stack([top2[:, 1] - top2[:, 0], top2[:, 1], neg_entropy], axis=-1)


def rescore(traces: Traces, heads: dict[int, HeadWeights], ids: np.ndarray | None) -> Traces:
    """The traces as they would be with every exit's head restricted to ``ids`` (None: the full vocabulary)."""
    if traces.hidden is None or traces.final is None:
        raise ValueError("these traces keep no hidden states; recalibrate with this eec")
    scores, agreed = traces.scores.copy(), traces.agreed.copy()
    for k, layer in enumerate(traces.exits):
        token, metrics = head_scores(heads[layer], traces.hidden[:, k], ids)
        scores[:, k, :3] = metrics
        agreed[:, k] = token == traces.final
    return Traces(traces.exits, scores, agreed, traces.sequence, traces.hidden, traces.final)
