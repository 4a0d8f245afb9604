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

from eec.calib.metrics import CLASSIFIER, COSINE, cosine
from eec.runtime.manifest import SegmentSpec


class SegmentState:
    """One segment's KV over its layers and its pending catch-up positions.

    A "concat" segment returns its presents as new tensors, fed back as the
    next call's pasts. A "shared" segment (GroupQueryAttention) is bound, with
    onnxruntime's IO binding, to one preallocated buffer per key and value that
    is both its past input and its present output, so the kernel appends the
    new positions in place: no copy of the cache and no allocation per token.
    The buffers grow by doubling when a sequence outgrows them.
    """

    def __init__(self, spec: SegmentSpec, session: ort.InferenceSession, kv_heads: int, head_dim: int,
                 capacity: int, context: int):
        self.spec, self.session, self.context = spec, session, context
        self.length = 0
        self.pending: np.ndarray | None = None  # [batch, n, hidden]
        layers = 2 * (spec.stop - spec.start)
        self.small = 1 if spec.emits_hidden and not spec.scores_exit else 2  # outputs before the presents
        self.binding = None
        if spec.kv_cache == "shared":
            self.binding = session.io_binding()
            # Its C binding's output list skips wrapping every bound KV buffer in a Python OrtValue
            # (~15 us a call); the public wrapper where a future onnxruntime renames it.
            self._outputs = getattr(self.binding, "_iobinding", self.binding).get_outputs
            for name in spec.outputs[: self.small]:  # bound first, so they lead `get_outputs()`
                self.binding.bind_output(name, "cpu")
            self.buffers = [np.zeros((1, kv_heads, min(capacity, context), head_dim), np.float32) for _ in range(layers)]
            self._bind_buffers()
        else:
            self.buffers = [np.zeros((1, kv_heads, 0, head_dim), np.float32)] * layers

    def _bind_buffers(self) -> None:
        spec, io = self.spec, self.binding
        for name_in, name_out, buf in zip(spec.inputs[3:], spec.outputs[self.small:], self.buffers):
            io.bind_input(name_in, "cpu", 0, np.float32, list(buf.shape), buf.ctypes.data)
            io.bind_output(name_out, "cpu", 0, np.float32, list(buf.shape), buf.ctypes.data)

    def _grow(self, needed: int) -> None:
        capacity = min(self.context, max(needed, 2 * self.buffers[0].shape[2]))
        grown = []
        for buf in self.buffers:
            new = np.zeros((*buf.shape[:2], capacity, buf.shape[3]), np.float32)
            new[:, :, : self.length] = buf[:, :, : self.length]
            grown.append(new)
        self.buffers = grown
        self._bind_buffers()

    @property
    def kv(self) -> list[np.ndarray]:
        """Past key, value per layer: [batch, kv_heads, length, head_dim] (views)."""
        return [buf[:, :, : self.length] for buf in self.buffers]

    def run(self, x: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Run the segment over x ([1, seq] ids or [1, seq, hidden]); append to the KV; return
        (hidden_out, exit_score or None), or (token, scores) for the last segment."""
        spec, past, seq = self.spec, self.length, x.shape[1]
        positions = np.arange(past, past + seq, dtype=np.int64)[None, :]
        if self.binding is None:
            feeds = {spec.inputs[0]: x, "position_ids": positions, "attention_mask": mask[:, : past + seq]}
            feeds.update(zip(spec.inputs[3:], self.buffers))
            outputs = self.session.run(None, feeds)
            self.buffers = outputs[self.small:]
        else:
            if past + seq > self.buffers[0].shape[2]:
                self._grow(past + seq)
            io = self.binding
            io.bind_cpu_input(spec.inputs[0], x)
            io.bind_cpu_input("position_ids", positions)
            io.bind_cpu_input("attention_mask", mask[:, : past + seq])
            for name in spec.outputs[: self.small]:  # their shapes change with seq: a fresh tensor each call
                io.bind_output(name, "cpu")
            self.session.run_with_iobinding(io)
            values = self._outputs()
            outputs = [values[i].numpy() for i in range(self.small)]
        self.length = past + seq
        return outputs[0], outputs[1] if self.small == 2 else None


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
        capacity: int = 256,
    ):
        """``capacity``: positions the shared KV buffers start with (they grow as needed)."""
        self.specs, self.heads = specs, heads
        self.mask = np.ones((1, context), dtype=np.int64)  # sliced, never reallocated
        self.states = [SegmentState(s, sess, kv_heads, head_dim, capacity, context) for s, sess in zip(specs, sessions)]

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
            x, scores = state.run(x, self.mask)
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
            row = np.full(len(head_scores[0]) + 2, np.nan, dtype=np.float32)
            row[:-2], row[-1] = head_scores[0], gate
            if previous is not None and (metric == COSINE or trace):  # the only readers of the cosine
                row[-2] = cosine(current, previous)
            result.exit_tokens[layer], result.scores[layer] = int(token[0]), row
            result.hidden[layer] = current
            previous = current
            if row[metric] >= thresholds[layer]:
                nxt = self.states[j + 1]
                nxt.pending = x if nxt.pending is None else np.concatenate([nxt.pending, x], axis=1)
                result.token, result.exit_layer = int(token[0]), layer
                return result
        raise AssertionError("unreachable: the last segment always returns")
