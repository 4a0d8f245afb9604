"""Speculative decoding with the artifact's own early exit: lossless (numpy + onnxruntime).

One *cycle* from the last token ``t`` (every segment's KV covers the positions before it):

1. Draft: run the segments up to the draft exit over ``t``, take the exit head's
   token ``d1`` and confidence; while the confidence reaches the threshold and
   fewer than ``max_draft`` tokens are drafted, go on from ``d1`` (``d2``, ...).
   Each draft is one call of the exit segment with its head inside, as an early
   exit is; the deeper segments do not run.
2. Verify: run the deeper segments once over the ``m`` drafted positions' exit
   hidden states (the exact catch-up's call), the last one through its verify
   graph, which returns the final head's token at every position: ``f1..fm``,
   where ``fi`` is what the full model emits after ``t, d1, ..., d(i-1)``.
3. Accept the longest prefix with ``di == fi``; emit it and the full model's token
   at the first mismatch (``f1..f(n+1)``, or all ``m`` when every draft holds).
   Every emitted token is the full model's, so the output is ``full`` mode's.
4. Roll back: each segment's KV keeps the positions whose input was emitted;
   the drafts after the first mismatch are forgotten (`SegmentKV.truncate`).

The exit threshold (from ε, as in early-exit mode) only decides how far to
draft: a draft the exit is unsure of ends the cycle, so a verify is rarely
spent on tokens the exit would not have kept.

``speculative`` equals ``full`` up to the difference between one call over
``m`` positions and ``m`` calls over one, as the exact catch-up does: kernels
round a call over several positions differently (attention sums in another
order). In fp32 that stays rounding (tokens identical in the tests); int8 and
int4 artifacts quantize activations to int8 inside their products, which turns
those last-bit differences into whole quantization steps now and then and
flips close calls: on SmolLM2 int4, full mode's own prefill of a prefix and
its token-by-token decode disagree at 2 of 32 positions (int8: 1; fp32: 0),
so speculative and full generations part after a few tokens there, each a
faithful run of the quantized model (docs/benchmarks.md, speculative mode on SmolLM2).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from eec.calib.metrics import CLASSIFIER, GRAPH_METRICS
from eec.runtime.core import Decoder
from eec.runtime.kv import PLAIN, VERIFY, WITH_HEAD

DEFAULT_MAX_DRAFT = 6


@dataclass
class Cycle:
    tokens: list[int]  # emitted: the full model's tokens
    drafted: int  # tokens the exit proposed
    accepted: int  # of them, the ones the full model confirmed and that were emitted
    calls: int  # draft calls made, positions verified


def cycle(decoder: Decoder, token: int, exit_index: int, threshold: float, metric: int, max_draft: int) -> Cycle:
    """Draft up to ``max_draft`` tokens after ``token`` at the exit ending segment ``exit_index``,
    verify them with the deeper segments, keep the full model's tokens; see the module's docstring.
    ``threshold`` applies to metric ``metric`` (a head score, or the segment's classifier score)."""
    states = decoder.states
    start = states[0].length
    hidden, drafts = [], []
    for _ in range(max_draft):
        x = np.asarray([[token]], dtype=np.int64)
        for j in range(exit_index + 1):
            inside = j == exit_index and states[j].has(WITH_HEAD) and metric != CLASSIFIER  # the head in the call
            role = WITH_HEAD if inside else PLAIN
            outputs = dict(zip(states[j].graphs[role].names, states[j].call(role, [0], x)))
            x = outputs["hidden_out"]
        hidden.append(x.copy())  # a one-position call's outputs are overwritten by the next call
        if metric == CLASSIFIER and not float(outputs["exit_score"][0]) >= threshold:
            drafts.append(-1)  # the classifier is unsure: verify without running the head
            break
        if inside:
            token, scores = int(outputs["exit_token"][0]), outputs["exit_scores"][0]
        else:
            token, scores = decoder.heads[exit_index](x)
        drafts.append(token)
        if metric < len(GRAPH_METRICS) and not float(scores[metric]) >= threshold:
            break
    h = np.concatenate(hidden, axis=1)
    last = len(states) - 1
    for j in range(exit_index + 1, len(states)):
        h = states[j].call(VERIFY if j == last else PLAIN, [0], h)[0]
    final = [int(t) for t in np.asarray(h).reshape(-1)]
    accepted = 0
    while accepted < len(drafts) and drafts[accepted] == final[accepted]:
        accepted += 1
    emitted = final[: min(accepted + 1, len(drafts))]
    for state in states:
        state.truncate(start + len(emitted))
    return Cycle(emitted, sum(d >= 0 for d in drafts), accepted, len(drafts))
