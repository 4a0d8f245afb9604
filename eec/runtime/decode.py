"""One sequence's decoding state and the per-token step over the segments.

Each segment keeps its layers' KV and a *pending* list: hidden states of
positions that exited before reaching it. Pending positions are contiguous
and directly follow the segment's KV, so positions are implied by lengths.
The next token that goes that deep catches them up first, one of two ways:

- ``"exact"`` (synchronized catch-up): the segment runs over
  ``[pending..., current]`` in one call, so every layer's KV equals what the
  full model computes for the generated sequence; its outputs for the
  pending positions become the next segment's pending.
- ``"propagate"`` (CALM's state propagation): the segment's fill graph
  writes each layer's KV of the pending positions from their exit's hidden
  state (norm and key/value projections only, no attention output or MLP),
  and the same hidden states become the next segment's pending. The first
  layer after the exit is exact; deeper layers approximate the full model.
  Cheaper where most tokens leave early: the deep layers' full compute
  for every exited token is what the exact catch-up pays.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort

from eec.calib.metrics import CLASSIFIER, COSINE, GRAPH_METRICS, cosine
from eec.runtime.manifest import SegmentSpec

CATCH_UPS = ("exact", "propagate")


class BoundGraph:
    """One graph over a segment's KV (the segment, the segment with its exit head inside, or its
    KV fill) and, for shared KV, its onnxruntime IO binding. Its outputs are the small ones
    (hidden state, scores) followed by the presents, named ``present_*``."""

    def __init__(self, session: ort.InferenceSession, shared: bool):
        self.session = session
        # The small outputs come first; kept, since a call that rebinds them must not ask the session again.
        self.small_outputs = [o for o in session.get_outputs() if not o.name.startswith("present_")]
        self.small = len(self.small_outputs)
        self.one: tuple | None = None  # fixed one-position arrays, while bound (`SegmentState._call`)
        self.binding = session.io_binding() if shared else None
        if self.binding is not None:
            # Its C binding's output list skips wrapping every bound KV buffer in a Python OrtValue
            # (~15 us a call); the public wrapper where a future onnxruntime renames it.
            self.outputs = getattr(self.binding, "_iobinding", self.binding).get_outputs
            for out in self.small_outputs:  # bound first, so they lead `get_outputs()`
                self.binding.bind_output(out.name, "cpu")


class SegmentState:
    """One segment's KV over its layers and its pending catch-up positions.

    A "concat" segment returns its presents as new tensors, fed back as the
    next call's pasts. A "shared" segment (GroupQueryAttention) is bound, with
    onnxruntime's IO binding, to one preallocated buffer per key and value that
    is both its past input and its present output, so the kernel appends the
    new positions in place: no copy of the cache and no allocation per token.
    The buffers grow by doubling when a sequence outgrows them. Every graph
    of the segment (`BoundGraph`) reads and appends to the same KV.
    """

    def __init__(self, spec: SegmentSpec, session: ort.InferenceSession, kv_heads: int, head_dim: int,
                 capacity: int, context: int, fill: ort.InferenceSession | None = None,
                 with_head: ort.InferenceSession | None = None, max_call: int | None = None,
                 device: str = "cpu", verify: ort.InferenceSession | None = None):
        """``fill``: the segment's KV fill session (`fill_kv`); ``with_head``: the segment's graph
        with its exit head inside (`run(with_head=True)`); ``verify``: the last segment's graph with
        the token at every position (`run(verify=True)`); ``max_call``: the most positions one call
        may carry (None: any); ``device``: where a shared KV lives, "cpu" or "cuda" (sessions on
        onnxruntime's CUDA provider, which then never copy the cache to the host)."""
        self.spec, self.context, self.max_call, self.device = spec, context, max_call, device
        # fp32, or fp16 where the precision pass gave the graph a half-precision KV.
        types = {i.name: i.type for i in session.get_inputs()}
        self.kv_dtype = ONNX_DTYPES[types[spec.inputs[3]]] if len(spec.inputs) > 3 else np.float32
        self.length = 0
        self.pending: np.ndarray | None = None  # [batch, n, hidden]
        shared = spec.kv_cache == "shared"
        self.plain = BoundGraph(session, shared)
        self.fill = BoundGraph(fill, shared) if fill is not None else None
        self.with_head = BoundGraph(with_head, shared) if with_head is not None else None
        self.verify = BoundGraph(verify, shared) if verify is not None else None
        layers = 2 * (spec.stop - spec.start)
        if shared:
            shape = (1, kv_heads, min(capacity, context), head_dim)
            self.buffers = [self._new_buffer(np.zeros(shape, self.kv_dtype)) for _ in range(layers)]
            self._bind_buffers()
        else:  # fed and returned as arrays, on any provider
            self.device = "cpu"
            self.buffers = [np.zeros((1, kv_heads, 0, head_dim), self.kv_dtype)] * layers

    def _new_buffer(self, values: np.ndarray):
        """A KV buffer holding ``values``: the array itself on the CPU, a device OrtValue on a GPU."""
        return values if self.device == "cpu" else ort.OrtValue.ortvalue_from_numpy(values, self.device, 0)

    def _bind_buffers(self) -> None:
        kv_in, kv_out = self.spec.inputs[3:], [n for n in self.spec.outputs if n.startswith("present_")]
        for graph in (self.plain, self.fill, self.with_head, self.verify):
            if graph is None:
                continue
            for name_in, name_out, buf in zip(kv_in, kv_out, self.buffers):
                if self.device == "cpu":
                    graph.binding.bind_input(name_in, "cpu", 0, buf.dtype, list(buf.shape), buf.ctypes.data)
                    graph.binding.bind_output(name_out, "cpu", 0, buf.dtype, list(buf.shape), buf.ctypes.data)
                else:
                    graph.binding.bind_ortvalue_input(name_in, buf)
                    graph.binding.bind_ortvalue_output(name_out, buf)

    @property
    def capacity(self) -> int:
        """Positions the shared KV buffers hold before they grow."""
        return self.buffers[0].shape()[2] if self.device != "cpu" else self.buffers[0].shape[2]

    def _grow(self, needed: int) -> None:
        capacity = min(self.context, max(needed, 2 * self.capacity))
        grown = []
        for old in self.kv:  # through the host on a GPU: growing is rare (doubling), the copy is simple
            new = np.zeros((*old.shape[:2], capacity, old.shape[3]), self.kv_dtype)
            new[:, :, : self.length] = old
            grown.append(self._new_buffer(new))
        self.buffers = grown
        self._bind_buffers()

    @property
    def kv(self) -> list[np.ndarray]:
        """Past key, value per layer: [batch, kv_heads, length, head_dim] (views on the CPU, copies from a GPU)."""
        if self.device != "cpu":
            return [buf.numpy()[:, :, : self.length] for buf in self.buffers]
        return [buf[:, :, : self.length] for buf in self.buffers]

    def write_kv(self, values: list[np.ndarray]) -> None:
        """Set the cache to ``values`` (key, value per layer, [1, kv_heads, n, head_dim]): n cached positions."""
        n = values[0].shape[2]
        if self.spec.kv_cache != "shared":
            self.buffers = [v.astype(self.kv_dtype) for v in values]
        else:
            if n > self.capacity:
                self._grow(n)
            for buf, v in zip(self.buffers, values):
                if self.device == "cpu":
                    buf[:, :, :n] = v
                else:
                    host = buf.numpy()
                    host[:, :, :n] = v
                    buf.update_inplace(host)
        self.length = n

    def run(self, x: np.ndarray, mask: np.ndarray, with_head: bool = False, verify: bool = False) -> list[np.ndarray]:
        """Run the segment over x ([1, seq] ids or [1, seq, hidden]) and append to the KV. Returns
        [hidden_out] (+ [exit_score] with a classifier, + [exit_token, exit_scores] ``with_head``),
        or [token] for the last segment ([token, scores] in artifacts before session 6; ``verify``:
        [tokens], one per position, [1, seq])."""
        return self._chunked(self.verify if verify else self.with_head if with_head else self.plain, x, mask)

    def truncate(self, length: int) -> None:
        """Forget the cached positions from ``length`` on (speculative decoding's rejected drafts). A
        shared buffer keeps their values, which the next call overwrites: the mask hides them till then."""
        if not 0 <= length <= self.length or self.pending is not None:
            raise ValueError(f"cannot cut {self.length} cached positions to {length} with pending positions")
        if self.spec.kv_cache != "shared":
            self.buffers = [b[:, :, :length] for b in self.buffers]
        self.length = length

    def fill_kv(self, hidden: np.ndarray, mask: np.ndarray) -> None:
        """Append the KV of ``hidden``'s positions ([1, n, hidden]) with the fill graph."""
        self._chunked(self.fill, hidden, mask)

    def _chunked(self, graph: BoundGraph, x: np.ndarray, mask: np.ndarray) -> list[np.ndarray]:
        """`_call` in pieces of at most ``max_call`` positions (TensorRT engines are built for calls of
        1..8 positions; a prompt or a catch-up can be longer). Only ``hidden_out`` is per position:
        the pieces' are joined; every other output is the last position's, from the last piece."""
        step = self.max_call
        if step is None or x.shape[1] <= step:
            return self._call(graph, x, mask)
        # Copied: a one-position piece returns fixed arrays, which the next one overwrites.
        pieces = [[np.array(o) for o in self._call(graph, x[:, i: i + step], mask)] for i in range(0, x.shape[1], step)]
        outputs = pieces[-1]
        if (self.spec.emits_hidden or graph is self.verify) and outputs:  # per position: joined
            outputs[0] = np.concatenate([p[0] for p in pieces], axis=1)
        return outputs

    def _call(self, graph: BoundGraph, x: np.ndarray, mask: np.ndarray) -> list[np.ndarray]:
        """One call of one of the segment's graphs after the cached positions: the KV grows by x's
        length; returns the outputs before the presents. A one-position call of a graph with small
        outputs returns fixed arrays, which its next one-position call overwrites."""
        past, seq, io, name = self.length, x.shape[1], graph.binding, self.spec.inputs[0]
        if io is None:
            feeds = {name: x, "position_ids": np.arange(past, past + seq, dtype=np.int64)[None, :],
                     "attention_mask": mask[:, : past + seq]}
            feeds.update(zip(self.spec.inputs[3:], self.buffers))
            outputs = graph.session.run(None, feeds)
            self.buffers, outputs = outputs[graph.small:], outputs[: graph.small]
        else:
            if past + seq > self.capacity:
                self._grow(past + seq)
            if seq == 1 and graph.small:
                # The decode step: inputs and outputs stay bound to fixed one-position arrays,
                # so a call rebinds the mask alone (each bind is ~1 us of a ~70 us segment).
                if graph.one is None:
                    graph.one = self._bind_one(graph, name, x)
                x_one, positions, outputs = graph.one
                x_one[...] = x
                positions[0, 0] = past
                if self.device != "cpu":  # a host input bound for a GPU graph is copied when bound, not when run
                    io.bind_cpu_input(name, x_one)
                    io.bind_cpu_input("position_ids", positions)
                io.bind_cpu_input("attention_mask", mask[:, : past + 1])
                graph.session.run_with_iobinding(io)
            else:
                graph.one = None  # rebinding x, positions and outputs below
                io.bind_cpu_input(name, x)
                io.bind_cpu_input("position_ids", np.arange(past, past + seq, dtype=np.int64)[None, :])
                io.bind_cpu_input("attention_mask", mask[:, : past + seq])
                for out in graph.small_outputs:  # their shapes change with seq: fresh tensors
                    io.bind_output(out.name, "cpu")
                graph.session.run_with_iobinding(io)
                values = graph.outputs() if graph.small else []
                outputs = [values[i].numpy() for i in range(graph.small)]
        self.length = past + seq
        return outputs

    @staticmethod
    def _bind_one(graph: BoundGraph, name: str, like: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
        """Bind a graph's input ``name`` (shaped ``like``), positions and small outputs to fixed arrays."""
        x = np.zeros(like.shape, like.dtype)
        positions = np.zeros((1, 1), np.int64)
        outputs = []
        for out in graph.small_outputs:  # symbolic dims are batch and seq: 1 each
            array = np.zeros([d if isinstance(d, int) else 1 for d in out.shape], ONNX_DTYPES[out.type])
            graph.binding.bind_output(out.name, "cpu", 0, array.dtype, list(array.shape), array.ctypes.data)
            outputs.append(array)
        for input_name, array in ((name, x), ("position_ids", positions)):
            graph.binding.bind_input(input_name, "cpu", 0, array.dtype, list(array.shape), array.ctypes.data)
        return x, positions, outputs


ONNX_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64}


class HeadCall:
    """An exit head's session with its two small outputs bound once to fixed arrays: a call
    allocates nothing and skips `InferenceSession.run`'s per-call feed and output handling."""

    def __init__(self, session: ort.InferenceSession, device: str = "cpu"):
        """``device``: "cuda" when the session runs on a GPU, where a bound host input is copied when
        bound: it is then bound again for every call."""
        self.session, self.rebind = session, device != "cpu"
        # A stand-in with run() alone (one that records feeds, `eec.compiler.precision.record_feeds`) is run plainly.
        self.binding = session.io_binding() if hasattr(session, "run_with_iobinding") else None
        self.token = np.zeros(1, dtype=np.int64)
        self.scores = np.zeros((1, len(GRAPH_METRICS)), dtype=np.float32)
        for name, out in (("token", self.token), ("scores", self.scores)):
            if self.binding is not None:
                self.binding.bind_output(name, "cpu", 0, out.dtype, list(out.shape), out.ctypes.data)
        self.bound: np.ndarray | None = None  # the array "hidden" is bound to, kept alive while bound

    def __call__(self, hidden: np.ndarray) -> tuple[int, np.ndarray]:
        """(token, scores) of ``hidden``'s last position; the scores array is reused by the next call.
        ``hidden`` is read by address: the caller keeps it unchanged until the call returns."""
        if self.binding is None:
            self.token[:], self.scores[:] = self.session.run(None, {"hidden": hidden})
        else:
            if hidden is not self.bound or self.rebind:  # a segment's fixed one-position output stays bound across calls
                hidden = np.ascontiguousarray(hidden)
                self.binding.bind_input("hidden", "cpu", 0, hidden.dtype, list(hidden.shape), hidden.ctypes.data)
                self.bound = hidden
            self.session.run_with_iobinding(self.binding)
        return int(self.token[0]), self.scores[0]


@dataclass
class StepResult:
    token: int
    exit_layer: int  # layers the token passed through (num_layers for the final head)
    # Filled when tracing (`Decoder.step(trace=True)`), for every head that ran:
    scores: dict[int, np.ndarray] = field(default_factory=dict)  # layer -> one value per ALL_METRICS
    exit_tokens: dict[int, int] = field(default_factory=dict)  # layer -> that head's token
    hidden: dict[int, np.ndarray] = field(default_factory=dict)  # layer -> last position's hidden state


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
        fills: dict[str, ort.InferenceSession] | None = None,
        catch_up: str = "exact",
        with_heads: dict[str, ort.InferenceSession] | None = None,
        max_call: int | None = None,
        device: str = "cpu",
        verifies: dict[str, ort.InferenceSession] | None = None,
        monitor: bool = False,
    ):
        """``capacity``: positions the shared KV buffers start with (they grow as needed); ``fills``:
        the segments' KV fill sessions by file, which ``catch_up="propagate"`` needs; ``with_heads``:
        the segments' graphs with their exit head inside by file, run in place of the segment and
        its head whenever the step asks for that exit (not in full mode); ``max_call``: the most
        positions one graph call may carry (TensorRT's engines), longer ones run in pieces; ``device``:
        where the KV lives ("cuda" for sessions on onnxruntime's CUDA provider); ``verifies``: the last
        segment's verify session by file (`eec.runtime.speculative`); ``monitor``: check exited
        tokens against the final head as the exact catch-up reaches the last segment (needs its
        verify session): `checked` and `agreed` count them."""
        self.specs, self.propagate = specs, catch_up == "propagate"
        # One call per exit, not per head file: each stays bound to its own segment's output.
        self.heads = [HeadCall(heads[s.exit.file], device) if s.exit and s.exit.file in heads else None for s in specs]
        self.mask = np.ones((1, context), dtype=np.int64)  # sliced, never reallocated
        fills, with_heads, verifies = fills or {}, with_heads or {}, verifies or {}
        if self.propagate and any(s.fill not in fills for s in specs[1:]):
            raise ValueError("catch_up='propagate' needs a KV fill graph for every segment after the first")
        self.states = [SegmentState(s, sess, kv_heads, head_dim, capacity, context, fills.get(s.fill),
                                    with_heads.get(s.with_head), max_call, device, verifies.get(s.verify))
                       for s, sess in zip(specs, sessions)]
        if monitor and (self.propagate or self.states[-1].verify is None):
            raise ValueError("monitoring exits needs the last segment's verify graph and the exact catch-up")
        self.monitor = monitor
        # Tokens that left at an exit since the last segment last ran, in order: the exact catch-up
        # brings their positions to the last segment with the next token that goes that deep.
        self.unchecked: list[int] = []
        self.checked = 0  # exited tokens the final head has judged (monitor)
        self.agreed = 0  # of them, the ones it would have emitted too

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
        previous = None  # last position's hidden state at the previous exit
        last = len(self.specs) - 1
        result = StepResult(token=-1, exit_layer=-1)
        for j, spec in enumerate(self.specs):
            state = self.states[j]
            if state.pending is not None:
                if self.propagate:
                    state.fill_kv(state.pending, self.mask)
                    if j < last:
                        nxt = self.states[j + 1]
                        nxt.pending = state.pending if nxt.pending is None else np.concatenate([nxt.pending, state.pending], axis=1)
                else:
                    x = np.concatenate([state.pending, x], axis=1)
                state.pending = None
            layer = spec.exit.layer
            asked = thresholds is not None and layer in thresholds
            # Monitoring: the final head over the caught-up positions too, each the full model's token
            # after that position, to compare with what its exit emitted.
            verify = j == last and self.monitor and bool(self.unchecked)
            outputs = state.run(x, self.mask, with_head=asked and state.with_head is not None, verify=verify)
            x = outputs[0]
            if j == last:
                if verify:
                    tokens = np.asarray(x).reshape(-1)
                    final = tokens[-1 - len(self.unchecked): -1]
                    self.checked += len(self.unchecked)
                    self.agreed += int(np.sum(final == np.asarray(self.unchecked)))
                    x = tokens[-1:]
                self.unchecked = []
                result.token, result.exit_layer = int(x[0]), layer
                if trace:  # the final head has no confidence scores (artifacts before session 6 did)
                    scores = outputs[1][0] if len(outputs) > 1 else np.full(len(GRAPH_METRICS), np.nan)
                    result.exit_tokens[layer], result.scores[layer] = result.token, np.append(scores, [np.nan, np.nan])
                return result
            current = x[0, -1]
            if not asked:
                previous = current
                continue
            gate = float(outputs[1][0]) if spec.scores_exit else np.nan
            if metric == CLASSIFIER and not trace and not gate >= thresholds[layer]:
                previous = current  # the classifier says stay: the head's projection is never run
                continue
            if state.with_head is not None:  # the head ran inside the segment's call
                token, head_scores = int(outputs[-2][0]), outputs[-1][0]
            else:
                token, head_scores = self.heads[j](x)
            if metric < len(GRAPH_METRICS):
                value = float(head_scores[metric])
            elif metric == CLASSIFIER:
                value = gate
            else:  # the cosine with the previous exit's hidden state; none at the first exit
                value = np.nan if previous is None else cosine(current, previous)
            if trace:
                row = np.full(len(GRAPH_METRICS) + 2, np.nan, dtype=np.float32)
                row[: len(GRAPH_METRICS)], row[-1] = head_scores, gate
                if previous is not None:
                    row[COSINE] = cosine(current, previous)
                result.exit_tokens[layer], result.scores[layer], result.hidden[layer] = token, row, current.copy()
            previous = current
            if value >= thresholds[layer]:
                nxt = self.states[j + 1]
                nxt.pending = x.copy() if nxt.pending is None else np.concatenate([nxt.pending, x], axis=1)
                result.token, result.exit_layer = token, layer
                if self.monitor:
                    self.unchecked.append(token)
                return result
        raise AssertionError("unreachable: the last segment always returns")
