"""One sequence's decoding state and the per-token step over the segments.

Each segment keeps its layers' KV and a *pending* list: hidden states at
its input for positions that exited before reaching it. The next token that
goes that deep runs the segment over ``[pending..., current]`` in one call
(synchronized catch-up), so every layer's KV always equals what the full
model computes for the generated sequence. Pending positions are contiguous
and directly follow the segment's KV, so positions are implied by lengths.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort

from eec.calib.metrics import CLASSIFIER, cosine
from eec.runtime.manifest import SegmentSpec


@dataclass
class SegmentState:
    kv: list[np.ndarray]  # past key, value per layer: [batch, kv_heads, length, head_dim]
    pending: np.ndarray | None = None  # [batch, n, hidden]

    @property
    def length(self) -> int:
        return self.kv[0].shape[2]


@dataclass
class StepResult:
    token: int
    exit_layer: int  # layers the token passed through (num_layers for the final head)
    scores: dict[int, np.ndarray] = field(default_factory=dict)  # layer -> one value per ALL_METRICS, heads that ran
    exit_tokens: dict[int, int] = field(default_factory=dict)  # layer -> that head's token
    hidden: dict[int, np.ndarray] = field(default_factory=dict)  # layer -> last position's hidden state, heads that ran


class Decoder:
    """Runs the segments and exit heads for one sequence (batch 1)."""

    def __init__(
        self,
        specs: list[SegmentSpec],
        sessions: list[ort.InferenceSession],
        heads: dict[str, ort.InferenceSession],
        kv_heads: int,
        head_dim: int,
        context: int,
    ):
        self.specs, self.sessions, self.heads = specs, sessions, heads
        self.mask = np.ones((1, context), dtype=np.int64)  # sliced, never reallocated
        empty = np.zeros((1, kv_heads, 0, head_dim), dtype=np.float32)
        self.states = [SegmentState(kv=[empty] * (2 * (s.stop - s.start))) for s in specs]

    def _run(self, j: int, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Run segment j over x; keep its KV; return (hidden_out, exit_score or None) or (token, scores)."""
        spec, state = self.specs[j], self.states[j]
        past, seq = state.length, x.shape[1]
        feeds = {
            spec.inputs[0]: x,
            "position_ids": np.arange(past, past + seq, dtype=np.int64)[None, :],
            "attention_mask": self.mask[:, : past + seq],
        }
        feeds.update(zip(spec.inputs[3:], state.kv))
        outputs = self.sessions[j].run(None, feeds)
        if spec.emits_hidden and not spec.scores_exit:
            state.kv = outputs[1:]
            return outputs[0], None
        state.kv = outputs[2:]
        return outputs[0], outputs[1]

    def step(self, ids: np.ndarray, thresholds: dict[int, float] | None, metric: int = 0,
             trace: bool = False) -> StepResult:
        """Feed ``ids`` ([1, n] int64) and predict the next token.

        ``thresholds`` maps exit layer -> minimum score of metric ``metric``
        (an index into `ALL_METRICS`); an exit not in it is passed without
        running its head (None: full mode). With the ``classifier`` metric the
        segment's own exit score decides first, and the head runs only for a
        token that leaves. ``trace`` runs the head of every exit in
        ``thresholds`` whatever the scores (calibration).
        """
        x = ids
        result = StepResult(token=-1, exit_layer=-1)
        previous = None  # last position's hidden state at the previous exit
        last = len(self.specs) - 1
        for j, spec in enumerate(self.specs):
            state = self.states[j]
            if state.pending is not None:
                x = np.concatenate([state.pending, x], axis=1)
                state.pending = None
            x, scores = self._run(j, x)
            layer = spec.exit.layer
            if j == last:
                result.token, result.exit_layer = int(x[0]), layer
                result.exit_tokens[layer], result.scores[layer] = result.token, np.append(scores[0], [np.nan, np.nan])
                return result
            current = x[0, -1]
            if thresholds is None or layer not in thresholds:
                previous = current
                continue
            gate = np.nan if scores is None else float(scores[0])
            if metric == CLASSIFIER and not trace and not gate >= thresholds[layer]:
                previous = current  # the classifier says stay: the head's projection is never run
                continue
            token, head_scores = self.heads[spec.exit.file].run(None, {"hidden": x})
            row = np.append(head_scores[0], [np.nan if previous is None else cosine(current, previous), gate])
            result.exit_tokens[layer], result.scores[layer] = int(token[0]), row
            result.hidden[layer] = current
            previous = current
            if row[metric] >= thresholds[layer]:
                nxt = self.states[j + 1]
                nxt.pending = x if nxt.pending is None else np.concatenate([nxt.pending, x], axis=1)
                result.token, result.exit_layer = int(token[0]), layer
                return result
        raise AssertionError("unreachable: the last segment always returns")
