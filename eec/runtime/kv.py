"""One segment's KV cache for a batch of sequences, and the graph calls that read and extend it.

A segment's KV holds ``rows`` slots, one sequence each, every slot with its
own length. Two layouts, chosen by the compiler (`SegmentSpec.kv_cache`):

- ``"shared"``: attention is onnxruntime's GroupQueryAttention. One
  preallocated buffer per key and value, ``[rows, kv_heads, capacity,
  head_dim]``, is bound (IO binding) as both the past input and the present
  output, so the kernel appends the new positions of each row in place, right
  after that row's own length (its ``seqlens_k``, from the attention mask):
  no copy of the cache and no allocation per token. The kernel allows a call
  over several rows only when each row adds one position, or when every row
  starts empty (a first prompt, right-padded); a call of several positions
  after a past must be one row ("batch_size must be 1 when sequence_length >
  1 and past context is given", onnxruntime 1.32). Rows are the outermost
  dimension, so any run of neighbouring slots is one contiguous block that a
  call binds by address; slots inside the run that take no part get a
  harmless one-position write after their length, which their next real
  position overwrites (`SegmentKV.call`).
- ``"concat"``: plain attention (TensorRT targets, head sizes
  GroupQueryAttention does not take). Each row's key and value are arrays of
  their own; a call pads the rows' pasts to one length, masks the padding and
  takes each row's new positions back out of the presents. Any call shape
  works; the padding is copied, as a concatenating graph copies its cache anyway.

Every graph of a segment (its roles: `PLAIN`, `WITH_HEAD`, `FILL`,
`VERIFY`) reads and appends to the same KV.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import onnxruntime as ort

from eec.calib.metrics import GRAPH_METRICS
from eec.runtime.manifest import FILL, PLAIN, ROLES, VERIFY, WITH_HEAD, SegmentSpec  # noqa: F401 (roles re-exported)

ONNX_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64}


class BoundGraph:
    """One graph of a segment and, for shared KV, its IO binding. Its outputs are the small ones
    (hidden state, scores, token) followed by the presents, named ``present_*``."""

    def __init__(self, session: ort.InferenceSession):
        self.session = session
        self.small_outputs = [o for o in session.get_outputs() if not o.name.startswith("present_")]
        self.small = len(self.small_outputs)
        self.names = [o.name for o in self.small_outputs]
        # Every position's output is joined when a call runs in pieces; the rest are the last position's.
        self.per_position = {"hidden_out", "tokens"} | ({"token"} if self._token_per_position() else set())
        # Shared KV only: the IO binding of the block of rows last called, its output list and the fixed
        # arrays of its one-position calls, switched between blocks by `SegmentKV._bind_kv`.
        self.binding, self.outputs, self.one = None, None, {}
        self.span: tuple[int, int, int] | None = None  # (first slot, end slot, buffers' generation) bound as KV
        self.spans: dict[tuple[int, int, int], tuple] = {}  # a binding per block of rows
    def _token_per_position(self) -> bool:
        """The verify graph's ``token`` is [batch, seq] (one per position), the final head's [batch]."""
        token = next((o for o in self.small_outputs if o.name == "token"), None)
        return token is not None and len(token.shape) == 2


class Pending:
    """Every row's pending positions in one store, [rows, capacity, ...] (hidden states, or ids),
    that doubles when a row outgrows it, and each row's count. ``pending[slot]`` is a view of the
    row's queued positions (None when it has none), ``pending[slot] = None`` forgets them, and
    ``pending[slot] = array`` sets a copy. A row that keeps leaving early queues a position every
    token: joining its whole queue each time was 5 µs a row and token, and queueing eight rows one
    by one still 23 µs of an early-exit step at batch 8 (code model); `add_rows` queues a position
    for each of several rows in one assignment."""

    def __init__(self, rows: int):
        self.counts = np.zeros(rows, dtype=np.int64)
        self.store: np.ndarray | None = None

    def __getitem__(self, slot: int) -> np.ndarray | None:
        n = self.counts[slot]
        return self.store[slot, :n] if n else None

    def __setitem__(self, slot: int, value: np.ndarray | None) -> None:
        self.counts[slot] = 0
        if value is not None:
            self.add(slot, np.array(value))  # a copy: the value may be a view of this store

    def add(self, slot: int, positions: np.ndarray) -> None:
        """Queue ``positions`` ([n, ...], copied) after the row's."""
        if not len(positions):
            return
        n = int(self.counts[slot])
        end = n + len(positions)
        self._fit(end, positions)
        self.store[slot, n:end] = positions
        self.counts[slot] = end

    def add_rows(self, slots: np.ndarray, positions: np.ndarray) -> None:
        """Queue one position for each row of ``slots`` (distinct): ``positions[i]`` after row ``slots[i]``'s."""
        n = self.counts[slots]
        self._fit(int(n.max()) + 1, positions)
        self.store[slots, n] = positions
        self.counts[slots] = n + 1

    def move(self, src: int, dst: int) -> None:
        n = int(self.counts[src])
        if n:
            self.store[dst, :n] = self.store[src, :n]
        self.counts[dst], self.counts[src] = n, 0

    def _fit(self, end: int, like: np.ndarray) -> None:
        """A store that holds ``end`` positions a row, of ``like``'s type and shape after its first axis."""
        store = self.store
        if store is not None and (store.dtype != like.dtype or store.shape[2:] != like.shape[1:]):
            if self.counts.any():
                raise ValueError(f"pending positions of shape {like.shape[1:]} ({like.dtype}) cannot join "
                                 f"queued ones of shape {store.shape[2:]} ({store.dtype})")
            store = None
        if store is not None and end <= store.shape[1]:
            return
        capacity = max(16, end, 0 if store is None else 2 * store.shape[1])
        grown = np.empty((len(self.counts), capacity, *like.shape[1:]), like.dtype)
        if store is not None:
            top = int(self.counts.max())
            grown[:, :top] = store[:, :top]
        self.store = grown


class SegmentKV:
    """The KV of one segment's layers for ``rows`` sequences, and the pending positions of each:
    hidden states of positions that left at an earlier exit, which this segment has not run yet
    (`eec.runtime.core`). Calls go through `call`."""

    def __init__(self, spec: SegmentSpec, graphs: Mapping[str, ort.InferenceSession], kv_heads: int, head_dim: int,
                 rows: int = 1, capacity: int = 256, context: int = 2048, max_call: int | None = None,
                 device: str = "cpu"):
        """``graphs``: the segment's sessions by role (`PLAIN` at least); ``capacity``: positions the
        shared buffers start with (they grow by doubling); ``max_call``: the most positions one call
        may carry (TensorRT's engines; None: any); ``device``: where a shared KV lives, "cpu" or
        "cuda" (sessions on onnxruntime's CUDA provider, which then never copy the cache to the host)."""
        self.spec, self.context, self.max_call, self.rows = spec, context, max_call, rows
        self.shared = spec.kv_cache == "shared"
        self.device = device if self.shared else "cpu"  # a concat cache is fed and returned as arrays
        self.graphs = {role: BoundGraph(s) for role, s in graphs.items() if s is not None}
        types = {i.name: i.type for i in self.graphs[PLAIN].session.get_inputs()}
        # fp32, or fp16 where the precision pass gave the graph a half-precision KV.
        self.kv_dtype = ONNX_DTYPES[types[spec.inputs[3]]] if len(spec.inputs) > 3 else np.float32
        self.kv_heads, self.head_dim = kv_heads, head_dim
        self.layers = 2 * (spec.stop - spec.start)
        self.lengths = np.zeros(rows, dtype=np.int64)
        self.pending = Pending(rows)  # per row: [n, hidden] or [n] ids, or None
        self.generation = 0  # bumped when the shared buffers are replaced (growth): bindings go stale
        self._ones = np.ones((1, context), dtype=np.int64)
        if self.shared:
            shape = (rows, kv_heads, max(1, min(capacity, context)), head_dim)
            self.buffers = [self._new_buffer(np.zeros(shape, self.kv_dtype)) for _ in range(self.layers)]
            self.capacity = shape[2]  # positions the buffers hold per row before they grow
            # A one-row, one-position call on the CPU reads the attention mask from this array, bound
            # once per row at the buffers' whole capacity: GroupQueryAttention takes the row's length
            # from its mask's sum and appends at it, and for one row the mask's width (its total
            # length) only sizes the present KV, which is the buffer anyway. Binding a mask of the
            # call's own length (an OrtValue made from a slice every call) was 25-55 µs of host time a
            # token at batch 1 (SmolLM2 int4, 2 cores; the same tokens either way, and no slower a call
            # at a width of 2048). Over several rows the kernel's work grows with the width (the code
            # model at 8 rows: 2.6% slower a call at 192 positions, 5.6% at 2048), so a call over
            # several rows binds a mask of its own length. ``masked``: the leading ones each row holds.
            self.mask = np.zeros((rows, self.capacity), dtype=np.int64)
            self.masked = [0] * rows
        else:
            self.row_kv = [[np.zeros((1, kv_heads, 0, head_dim), self.kv_dtype)] * self.layers for _ in range(rows)]

    def has(self, role: str) -> bool:
        return role in self.graphs

    # -- the cache -------------------------------------------------------------------------------

    def _new_buffer(self, values: np.ndarray):
        """A KV buffer holding ``values``: the array itself on the CPU, a device OrtValue on a GPU."""
        return values if self.device == "cpu" else ort.OrtValue.ortvalue_from_numpy(values, self.device, 0)

    def _grow(self, needed: int) -> None:
        if needed > self.context:
            raise ValueError(f"{needed} positions do not fit this model's context of {self.context}")
        capacity = min(self.context, max(needed, 2 * self.capacity))
        grown = []
        for old in self.buffers:  # through the host on a GPU: growing is rare (doubling), the copy is simple
            host = old.numpy() if self.device != "cpu" else old
            new = np.zeros((*host.shape[:2], capacity, host.shape[3]), self.kv_dtype)
            new[:, :, : host.shape[2]] = host
            grown.append(self._new_buffer(new))
        self.buffers = grown
        mask = np.zeros((self.rows, capacity), dtype=np.int64)
        mask[:, : self.capacity] = self.mask
        self.mask, self.capacity = mask, capacity
        self.generation += 1

    def kv_of(self, slot: int) -> list[np.ndarray]:
        """Key, value per layer of one row: [1, kv_heads, length, head_dim] (views on the CPU, copies from a GPU)."""
        n = int(self.lengths[slot])
        if not self.shared:
            return list(self.row_kv[slot])
        if self.device != "cpu":
            return [buf.numpy()[slot: slot + 1, :, :n] for buf in self.buffers]
        return [buf[slot: slot + 1, :, :n] for buf in self.buffers]

    @property
    def kv(self) -> list[np.ndarray]:
        """The first row's `kv_of` (a one-sequence decoder's)."""
        return self.kv_of(0)

    @property
    def length(self) -> int:
        return int(self.lengths[0])

    @length.setter
    def length(self, value: int) -> None:
        self.lengths[0] = value

    def write_kv(self, values: list[np.ndarray], slot: int = 0) -> None:
        """Set a row's cache to ``values`` (key, value per layer, [1, kv_heads, n, head_dim])."""
        n = values[0].shape[2]
        if not self.shared:
            self.row_kv[slot] = [v.astype(self.kv_dtype) for v in values]
        else:
            if n > self.capacity:
                self._grow(n)
            for buf, v in zip(self.buffers, values):
                if self.device == "cpu":
                    buf[slot, :, :n] = v[0]
                else:
                    host = buf.numpy()
                    host[slot, :, :n] = v[0]
                    buf.update_inplace(host)
        self.lengths[slot] = n

    def truncate(self, length: int, slot: int = 0) -> None:
        """Forget a row's cached positions from ``length`` on (speculative decoding's rejected drafts). A
        shared buffer keeps their values, which the next call overwrites: the mask hides them till then."""
        if not 0 <= length <= self.lengths[slot] or self.pending[slot] is not None:
            raise ValueError(f"cannot cut {self.lengths[slot]} cached positions to {length} with pending positions")
        if not self.shared:
            self.row_kv[slot] = [b[:, :, :length] for b in self.row_kv[slot]]
        self.lengths[slot] = length

    def add_pending(self, slot: int, hidden: np.ndarray) -> None:
        """Queue positions (``hidden``: [n, ...], copied) for this segment to run with the row's next
        deep token (`Pending`)."""
        self.pending.add(slot, hidden)

    def reset(self, slot: int) -> None:
        """Free a row for another sequence."""
        self.lengths[slot] = 0
        self.pending[slot] = None
        if not self.shared:
            self.row_kv[slot] = [np.zeros((1, self.kv_heads, 0, self.head_dim), self.kv_dtype)] * self.layers

    def move(self, src: int, dst: int) -> None:
        """Move row ``src``'s cache and pending positions to slot ``dst`` (keeping live rows together)."""
        n = int(self.lengths[src])
        if self.shared:
            for buf in self.buffers:
                if self.device == "cpu":
                    buf[dst, :, :n] = buf[src, :, :n]
                else:
                    host = buf.numpy()
                    host[dst, :, :n] = host[src, :, :n]
                    buf.update_inplace(host)
        else:
            self.row_kv[dst] = self.row_kv[src]
        self.lengths[dst] = n
        self.pending.move(src, dst)
        self.reset(src)

    # -- calls -----------------------------------------------------------------------------------

    def call(self, role: str, slots: Sequence[int], x: np.ndarray, counts: Sequence[int] | None = None) -> list[np.ndarray]:
        """Run the segment's ``role`` graph over ``x`` for the rows ``slots`` (in that order): ``x`` is
        [rows, seq] ids or [rows, seq, hidden], each row's new positions after its cached ones; row i
        has ``counts[i]`` real positions (default: all ``seq``), padding after them. Each row's KV grows
        by its count. Returns the small outputs, one row per slot: per-position ones ([rows, seq, ...])
        for every row, last-position ones (tokens, scores) for rows whose count is ``seq``. A
        one-row, one-position call of a graph with small outputs returns fixed arrays, which the
        next such call overwrites."""
        graph = self.graphs[role]
        slots = list(slots)
        rows, seq = x.shape[0], x.shape[1]
        if counts is None and (self.max_call is None or seq <= self.max_call):
            # The decode step's and a one-sequence catch-up's paths, checked no further.
            if seq == 1 and self.shared:
                return self._call_rows(graph, slots, x)
            if rows == 1:
                return self._call_one(graph, slots[0], x)
        counts = [seq] * rows if counts is None else [int(c) for c in counts]
        if rows != len(slots) or len(counts) != rows or not all(1 <= c <= seq for c in counts):
            raise ValueError(f"a call over {rows} rows needs one slot and a count in 1..{seq} per row")
        if self.max_call is not None and seq > self.max_call:
            # TensorRT engines are built for calls of 1..max_call positions: longer ones go in pieces, a row at a time.
            return self._stack(graph, [self._pieces(graph, s, x[i: i + 1, :c]) for i, (s, c) in enumerate(zip(slots, counts))], seq)
        if not self.shared:
            return self._call_concat(graph, slots, x, counts)
        if seq == 1:
            return self._call_rows(graph, slots, x)
        fresh = all(self.lengths[s] == 0 for s in slots)
        if rows > 1 and fresh and slots == list(range(slots[0], slots[0] + rows)):
            return self._call_shared(graph, slots[0], x, counts)  # a first prompt: rows right-padded
        # Several positions after a past: GroupQueryAttention takes one row a call.
        return self._stack(graph, [self._call_one(graph, s, x[i: i + 1, :c]) for i, (s, c) in enumerate(zip(slots, counts))], seq)

    @staticmethod
    def _stack(graph: BoundGraph, outputs: list[list[np.ndarray]], seq: int) -> list[np.ndarray]:
        """Each row's outputs, as the outputs of one call over all of them: per-position ones padded to ``seq``."""
        joined = []
        for k, out in enumerate(graph.small_outputs):
            parts = [np.asarray(o[k]) for o in outputs]
            if out.name in graph.per_position:
                parts = [p if p.shape[1] == seq else np.concatenate(
                    [p, np.zeros((p.shape[0], seq - p.shape[1], *p.shape[2:]), p.dtype)], axis=1) for p in parts]
            joined.append(parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0))
        return joined

    def _pieces(self, graph: BoundGraph, slot: int, x: np.ndarray) -> list[np.ndarray]:
        """One row's call in pieces of at most ``max_call`` positions; per-position outputs are joined,
        the others are the last piece's. Copied: a one-position piece returns fixed arrays."""
        step = self.max_call
        pieces = [[np.array(o) for o in self._call_one(graph, slot, x[:, i: i + step])] for i in range(0, x.shape[1], step)]
        outputs = pieces[-1]
        for k, out in enumerate(graph.small_outputs):
            if out.name in graph.per_position:
                outputs[k] = np.concatenate([p[k] for p in pieces], axis=1)
        return outputs

    def _call_one(self, graph: BoundGraph, slot: int, x: np.ndarray) -> list[np.ndarray]:
        """All of ``x``'s positions ([1, seq, ...]) for one row."""
        if not self.shared:
            return self._call_concat(graph, [slot], x, [x.shape[1]])
        return self._call_rows(graph, [slot], x) if x.shape[1] == 1 else self._call_shared(graph, slot, x, [x.shape[1]])

    def _mask(self, ends: np.ndarray, total: int) -> np.ndarray:
        """Each row's positions before its end, up to the call's total length."""
        if len(ends) == 1 and ends[0] == total:
            return self._ones[:, :total]  # one row, no padding: a slice, never reallocated
        return (np.arange(total)[None, :] < ends[:, None]).astype(np.int64)

    def _call_concat(self, graph: BoundGraph, slots: list[int], x: np.ndarray, counts: list[int]) -> list[np.ndarray]:
        """Pasts padded to the longest row's, new positions after them, each row's new KV taken back."""
        rows, seq = x.shape[0], x.shape[1]
        pasts = self.lengths[slots]
        longest = int(pasts.max())
        if rows == 1:
            kv = self.row_kv[slots[0]]
        else:
            kv = []
            for k in range(self.layers):
                block = np.zeros((rows, self.kv_heads, longest, self.head_dim), self.kv_dtype)
                for i, s in enumerate(slots):
                    block[i, :, : pasts[i]] = self.row_kv[s][k][0]
                kv.append(block)
        total = longest + seq
        mask = np.zeros((rows, total), dtype=np.int64)
        for i in range(rows):
            mask[i, : pasts[i]] = 1
            mask[i, longest: longest + counts[i]] = 1
        positions = (pasts[:, None] + np.arange(seq)[None, :]).astype(np.int64)
        name = self.spec.inputs[0]
        feeds = {name: x, "position_ids": positions, "attention_mask": mask if rows > 1 or seq != counts[0] else self._ones[:, :total]}
        feeds.update(zip(self.spec.inputs[3:], kv))
        outputs = graph.session.run(None, feeds)
        presents, outputs = outputs[graph.small:], outputs[: graph.small]
        for i, s in enumerate(slots):
            if rows == 1 and counts[0] == seq:
                self.row_kv[s] = presents
            else:
                self.row_kv[s] = [np.concatenate([p[i: i + 1, :, : pasts[i]], p[i: i + 1, :, longest: longest + counts[i]]], axis=2)
                                  for p in presents]
            self.lengths[s] = pasts[i] + counts[i]
        return outputs

    def _bind_kv(self, graph: BoundGraph, first: int, end: int) -> None:
        """Make the graph's binding the one whose past and present KV are rows ``first..end-1`` of the
        shared buffers. One binding per block of rows, kept: a batch's calls alternate between a few
        blocks, and rebinding every layer's key and value each time cost a third of a step's time."""
        key = (first, end, self.generation)
        if graph.span == key:
            return
        cached = graph.spans.get(key)
        if cached is None:
            if len(graph.spans) >= 64 or any(k[2] != self.generation for k in graph.spans):
                graph.spans.clear()
            io = graph.session.io_binding()
            for out in graph.small_outputs:  # bound first, so they lead the outputs
                io.bind_output(out.name, "cpu")
            kv_in, kv_out = self.spec.inputs[3:], [n for n in self.spec.outputs if n.startswith("present_")]
            for name_in, name_out, buf in zip(kv_in, kv_out, self.buffers):
                if self.device == "cpu":
                    shape = [end - first, *buf.shape[1:]]
                    address = buf.ctypes.data + first * buf.strides[0]
                    io.bind_input(name_in, "cpu", 0, buf.dtype, shape, address)
                    io.bind_output(name_out, "cpu", 0, buf.dtype, shape, address)
                elif first == 0 and end == self.rows:
                    io.bind_ortvalue_input(name_in, buf)
                    io.bind_ortvalue_output(name_out, buf)
                else:  # NOT VERIFIED on a GPU: a block of rows of a device buffer, bound by address
                    dims = buf.shape()
                    row_bytes = int(np.prod(dims[1:])) * np.dtype(self.kv_dtype).itemsize
                    shape = [end - first, *dims[1:]]
                    address = buf.data_ptr() + first * row_bytes
                    io.bind_input(name_in, self.device, 0, self.kv_dtype, shape, address)
                    io.bind_output(name_out, self.device, 0, self.kv_dtype, shape, address)
            cached = graph.spans[key] = (io, getattr(io, "_iobinding", io).get_outputs, {})
        graph.binding, graph.outputs, graph.one = cached
        graph.span = key

    def _call_shared(self, graph: BoundGraph, first: int, x: np.ndarray, counts: list[int]) -> list[np.ndarray]:
        """One call over the neighbouring rows ``first..first+len(x)-1``, every row taking part."""
        rows, seq = x.shape[0], x.shape[1]
        end = first + rows
        if rows == 1:  # one sequence's prompt or catch-up: Python ints, no array arithmetic (~10 us a call)
            past = int(self.lengths[first])
            top, ends = past, None
            positions = np.arange(past, past + seq, dtype=np.int64)[None, :]
            mask = self._ones[:, : past + seq] if counts[0] == seq else self._mask(np.asarray([past + counts[0]]), past + seq)
        else:
            pasts = self.lengths[first:end]
            top, ends = int(pasts.max()), pasts + np.asarray(counts)
            positions = (pasts[:, None] + np.arange(seq)[None, :]).astype(np.int64)
            mask = self._mask(ends, top + seq)
        if top + seq > self.capacity:
            self._grow(top + seq)
        self._bind_kv(graph, first, end)
        io, name = graph.binding, self.spec.inputs[0]
        io.bind_cpu_input(name, np.ascontiguousarray(x))
        io.bind_cpu_input("position_ids", positions)
        io.bind_cpu_input("attention_mask", mask)
        graph.one.clear()  # the inputs and outputs are rebound below; a one-position call binds them again
        for out in graph.small_outputs:  # their shapes change with seq: fresh tensors
            io.bind_output(out.name, "cpu")
        graph.session.run_with_iobinding(io)
        values = graph.outputs() if graph.small else []
        if rows == 1:
            self.lengths[first] = top + counts[0]
        else:
            self.lengths[first:end] = ends
        return [values[i].numpy() for i in range(graph.small)]

    def _call_rows(self, graph: BoundGraph, slots: list[int], x: np.ndarray) -> list[np.ndarray]:
        """One position for each of ``slots``: one call over each run of neighbouring slots, where a
        run may span slots that take no part (a dummy position each, written after their length
        and overwritten by their next real one) when that is cheaper than another call."""
        if len(slots) == 1 or all(b == a + 1 for a, b in zip(slots, slots[1:])):  # one block, in order: its own arrays
            return self._call_one_position(graph, slots[0], x, None)
        sorted_slots = sorted(slots)
        runs, start = [], 0
        for i in range(1, len(sorted_slots) + 1):
            if i == len(sorted_slots) or sorted_slots[i] - sorted_slots[i - 1] > 1 + SPAN_GAP:
                runs.append(sorted_slots[start:i])
                start = i
        calls = []
        for run in runs:
            first, end = run[0], run[-1] + 1
            block = np.zeros((end - first, *x.shape[1:]), x.dtype)
            taking = np.zeros(end - first, dtype=bool)
            for slot in run:
                block[slot - first] = x[slots.index(slot)]
                taking[slot - first] = True
            # Copied: the next block's call of the same size reuses the fixed output arrays.
            calls.append((run, first, [np.array(o) for o in self._call_one_position(graph, first, block, taking)]))
        rows = {slot: (first, outputs) for run, first, outputs in calls for slot in run}
        return [np.concatenate([rows[s][1][k][s - rows[s][0]: s - rows[s][0] + 1] for s in slots], axis=0)
                for k in range(graph.small)]

    def block_step(self, graph: BoundGraph, first: int, x: np.ndarray) -> list[np.ndarray]:
        """`call` of one position for every row of the block ``first..first+len(x)-1`` (shared KV), with
        nothing to check on the way: full mode's step, whose rows the engine keeps together."""
        return self._call_one_position(graph, first, x, None)

    def _call_one_position(self, graph: BoundGraph, first: int, x: np.ndarray, taking: np.ndarray | None) -> list[np.ndarray]:
        """One position for each row of the block ``first..first+len(x)-1``; rows not ``taking`` part
        keep their length (None: all take part). Inputs and small outputs stay bound to fixed arrays
        per block, and for one row on the CPU the mask too, so such a call binds nothing: it writes
        the new ids or hidden states, the position and the row's next mask entry into them."""
        rows = x.shape[0]
        end = first + rows
        if rows == 1:  # the common case (one sequence): Python ints, no array reductions
            top = int(self.lengths[first])
            pasts = None
        else:
            pasts = self.lengths[first:end]
            top = int(pasts.max())
        if top + 1 > self.capacity:
            self._grow(top + 1)
        if graph.span != (first, end, self.generation):
            self._bind_kv(graph, first, end)
        io = graph.binding
        fixed = graph.one.get(rows)
        if fixed is None:
            graph.one.clear()
            fixed = graph.one[rows] = self._bind_fixed(graph, self.spec.inputs[0], x)
        x_fixed, positions, outputs = fixed
        x_fixed[...] = x
        if pasts is None:
            positions[0, 0] = top
        else:
            positions[:, 0] = pasts
        if self.device == "cpu" and pasts is None:  # the row's mask: past + 1 ones
            masked = self.masked[first]
            if masked != top + 1:
                if masked == top:
                    self.mask[first, top] = 1
                else:
                    self.mask[first, : top + 1] = 1
                    self.mask[first, top + 1:] = 0
                self.masked[first] = top + 1
        elif self.device == "cpu":
            io.bind_cpu_input("attention_mask", self._mask(pasts + 1, top + 1))
        else:  # a host input bound for a GPU graph is copied when bound, not when run
            io.bind_cpu_input(self.spec.inputs[0], x_fixed)
            io.bind_cpu_input("position_ids", positions)
            io.bind_cpu_input("attention_mask", self._ones[:, : top + 1] if pasts is None else self._mask(pasts + 1, top + 1))
        graph.session.run_with_iobinding(io)
        if pasts is None:
            self.lengths[first] = top + (taking is None or bool(taking[0]))
        elif taking is None:
            self.lengths[first:end] += 1
        else:
            self.lengths[first:end] += taking
        return outputs

    def _bind_fixed(self, graph: BoundGraph, name: str, like: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
        """Bind a graph's input ``name`` (shaped ``like``), positions and small outputs to fixed arrays."""
        rows = like.shape[0]
        x = np.zeros(like.shape, like.dtype)
        positions = np.zeros((rows, 1), np.int64)
        outputs = []
        for out in graph.small_outputs:  # symbolic dims are batch (rows) and seq (1)
            shape = [rows if i == 0 else (d if isinstance(d, int) else 1) for i, d in enumerate(out.shape)]
            array = np.zeros(shape, ONNX_DTYPES[out.type])
            graph.binding.bind_output(out.name, "cpu", 0, array.dtype, list(array.shape), array.ctypes.data)
            outputs.append(array)
        for input_name, array in ((name, x), ("position_ids", positions)):
            graph.binding.bind_input(input_name, "cpu", 0, array.dtype, list(array.shape), array.ctypes.data)
        if self.device == "cpu" and rows == 1:  # the mask row of the slot the binding holds (`_bind_kv`), at full width
            first = graph.span[0]
            graph.binding.bind_input("attention_mask", "cpu", 0, np.int64, [1, self.capacity],
                                     self.mask.ctypes.data + first * self.mask.strides[0])
        return x, positions, outputs


# Slots between two runs of taking rows that one call covers with dummy positions rather than making
# two calls. A dummy row costs a row's compute; a call's fixed cost is worth a few rows on small models.
SPAN_GAP = 2


class HeadCall:
    """An exit head's session with its two small outputs bound to fixed arrays per batch size: a
    call allocates nothing and skips `InferenceSession.run`'s per-call feed and output handling."""

    def __init__(self, session: ort.InferenceSession, device: str = "cpu"):
        """``device``: "cuda" when the session runs on a GPU, where a bound host input is copied when
        bound: it is then bound again for every call."""
        self.session, self.rebind = session, device != "cpu"
        # A stand-in with run() alone (one that records feeds, `eec.compiler.precision.record_feeds`) is run plainly.
        self.binding = session.io_binding() if hasattr(session, "run_with_iobinding") else None
        self.rows = 0
        self.bound: np.ndarray | None = None  # the array "hidden" is bound to, kept alive while bound
        outputs = {o.name: o for o in session.get_outputs()}
        # The most likely tokens and their logits, for sampling (artifacts compiled with schema 2 on; older heads lack them).
        self.k = outputs["top_ids"].shape[-1] if "top_ids" in outputs else 0
        self._fix(1)

    def _fix(self, rows: int) -> None:
        self.rows = rows
        self.token = np.zeros(rows, dtype=np.int64)
        self.scores = np.zeros((rows, len(GRAPH_METRICS)), dtype=np.float32)
        self.top_ids = np.zeros((rows, self.k), dtype=np.int64) if self.k else None
        self.top_logits = np.zeros((rows, self.k), dtype=np.float32) if self.k else None
        self.arrays = [("token", self.token), ("scores", self.scores)] + (
            [("top_ids", self.top_ids), ("top_logits", self.top_logits)] if self.k else [])
        if self.binding is not None:
            for name, out in self.arrays:
                self.binding.bind_output(name, "cpu", 0, out.dtype, list(out.shape), out.ctypes.data)
        self.bound = None

    def batch(self, hidden: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(tokens [rows], scores [rows, metrics]) of the last position of each row of ``hidden``
        ([rows, seq, hidden]); both arrays, and ``top_ids`` and ``top_logits`` where the head has
        them, are reused by the next call. ``hidden`` is read by address: the caller keeps it
        unchanged until the call returns."""
        rows = hidden.shape[0]
        if rows != self.rows:
            self._fix(rows)
        if self.binding is None:
            values = self.session.run([name for name, _ in self.arrays], {"hidden": hidden})
            for (_, out), value in zip(self.arrays, values):
                out[...] = value
        else:
            if hidden is not self.bound or self.rebind:  # a segment's fixed one-position output stays bound across calls
                hidden = np.ascontiguousarray(hidden)
                self.binding.bind_input("hidden", "cpu", 0, hidden.dtype, list(hidden.shape), hidden.ctypes.data)
                self.bound = hidden
            self.session.run_with_iobinding(self.binding)
        return self.token, self.scores

    def __call__(self, hidden: np.ndarray) -> tuple[int, np.ndarray]:
        """(token, scores) of one row's last position; the scores array is reused by the next call."""
        tokens, scores = self.batch(hidden)
        return int(tokens[0]), scores[0]
