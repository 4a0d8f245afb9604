"""The decoding state of a batch of sequences and the step that runs it to each row's exit.

`Batch` owns, for every segment, the KV of up to ``rows`` sequences and
each row's *pending* positions: hidden states of positions that left at an
earlier exit and have not run that segment yet (`eec.runtime.kv.SegmentKV`).
Pending positions directly follow the row's cached ones, so positions are
implied by lengths. A step feeds each row its new positions (a prompt, or the
last token) and runs the segments in order; at each exit the rows whose
confidence reaches their threshold leave, and only the others go deeper: the
batch shrinks at every exit. A row that goes deeper than it did before
catches its pending positions up first, one of two ways:

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

Rows that add one position share one call per segment; a row that adds
several (a catch-up, a prompt after others have started) runs alone, as
GroupQueryAttention requires (`eec.runtime.kv`). So in a batch, with the
exact catch-up, a row that left at an exit and owes a deeper segment one
position *rides* the call that the rows going deeper make anyway: the batch's
positions stay one per row and call, and only a segment no row needs is
skipped (at batch 1 nothing rides, and a catch-up is one call over several
positions, as cheap as one). Decoding modes drive a
`Batch` (`eec.runtime.model`, `eec.runtime.speculative`, calibration traces,
teacher-forced evaluation); `Decoder` is its one-sequence face.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import onnxruntime as ort

from eec.calib.metrics import CLASSIFIER, COSINE, GRAPH_METRICS, cosine
from eec.runtime.kv import FILL, PLAIN, VERIFY, WITH_HEAD, HeadCall, SegmentKV
from eec.runtime.manifest import SegmentSpec
from eec.runtime.split import RemoteTail, TailBehind, TailUnavailable, new_session

CATCH_UPS = ("exact", "propagate")

Thresholds = Mapping[int, float] | None  # exit layer -> minimum score; None: full mode (no exit asked)


@dataclass
class StepResult:
    token: int
    exit_layer: int  # layers the token passed through (num_layers for the final head)
    # Filled when tracing (`Batch.step(trace=True)`), for every head that ran:
    scores: dict[int, np.ndarray] = field(default_factory=dict)  # layer -> one value per ALL_METRICS
    exit_tokens: dict[int, int] = field(default_factory=dict)  # layer -> that head's token
    hidden: dict[int, np.ndarray] = field(default_factory=dict)  # layer -> last position's hidden state
    # Asked for with ``sample``: the deciding head's most likely tokens and their logits, largest first
    # (None from an artifact whose heads do not return them).
    top_ids: np.ndarray | None = None
    top_logits: np.ndarray | None = None
    fallback: bool = False  # split: the server did not answer, the token is the device's last exit's


@dataclass
class _Rows:
    """One step's rows (`Batch.step`): their slots and, per row, its input to the segment at hand, its
    thresholds, whether it samples, its result so far and its last position's hidden state at the
    previous exit (the cosine metric's other half)."""

    slots: list[int]
    xs: list[np.ndarray]
    thresholds: list[Thresholds]
    metric: int
    trace: bool
    sampled: list[bool]
    results: list[StepResult]
    previous: list[np.ndarray | None]


class Positions:
    """A row's hidden states, one per position, in a buffer that doubles when full: adding and reading
    the latest ones cost what they hold, not the whole history (a split sends the new ones per token)."""

    def __init__(self, hidden: int, capacity: int = 64):
        self.data, self.length = np.empty((capacity, hidden), np.float32), 0

    def add(self, rows: np.ndarray) -> None:
        end = self.length + len(rows)
        if end > len(self.data):
            grown = np.empty((max(end, 2 * len(self.data)), self.data.shape[1]), np.float32)
            grown[: self.length] = self.data[: self.length]
            self.data = grown
        self.data[self.length: end] = rows
        self.length = end

    def since(self, start: int) -> np.ndarray:
        return self.data[start: self.length]


class Batch:
    """Segments, exit heads and KV for up to ``rows`` sequences, each in a slot of its own."""

    def __init__(self, specs: list[SegmentSpec], graphs: list[Mapping[str, ort.InferenceSession]],
                 heads: list[HeadCall | None], kv_heads: int, head_dim: int, context: int, rows: int = 1,
                 capacity: int = 256, catch_up: str = "exact", max_call: int | None = None, device: str = "cpu",
                 monitor: bool = False, tail: "RemoteTail | None" = None):
        """``graphs``: each segment's sessions by role (`eec.runtime.kv`); ``heads``: each segment's exit
        head call (None where the exit has no graph of its own); ``capacity``: positions the shared KV
        buffers start with; ``catch_up``: "exact" or "propagate"; ``max_call``: the most positions one
        graph call may carry (TensorRT's engines); ``device``: where the KV lives ("cuda" for sessions on
        onnxruntime's CUDA provider); ``monitor``: check exited tokens against the final head as the
        exact catch-up brings them to the last segment (its verify graph): `checked`, `agreed`; ``tail``:
        the layers after these segments run on a server (`eec.runtime.split`): the last segment here ends
        at an exit, and a row that does not leave there sends its hidden states to the server."""
        if catch_up not in CATCH_UPS:
            raise ValueError(f"catch_up must be one of {CATCH_UPS}, got {catch_up!r}")
        self.specs, self.heads, self.rows = specs, heads, rows
        self.propagate = catch_up == "propagate"
        self.kv = [SegmentKV(spec, g, kv_heads, head_dim, rows, capacity, context, max_call, device)
                   for spec, g in zip(specs, graphs)]
        if self.propagate and not all(kv.has(FILL) for kv in self.kv[1:]):
            raise ValueError("catch_up='propagate' needs a KV fill graph for every segment after the first")
        if monitor and (self.propagate or not self.kv[-1].has(VERIFY)):
            raise ValueError("monitoring exits needs the last segment's verify graph and the exact catch-up")
        self.monitor = monitor
        self.tail = tail
        if tail is not None and (self.propagate or monitor):
            raise ValueError("a split decodes with the exact catch-up, without the monitor")
        # Split: every position's hidden state at the split, per row (a resend after a server restart
        # needs them all), how many of them the server has, and the row's session id (given at its first
        # request).
        self.boundary: list[Positions | None] = [None] * rows
        self.sent = np.zeros(rows, dtype=np.int64)
        self.sessions = [""] * rows
        # Per row: tokens that left at an exit since the last segment last ran, in order; the exact
        # catch-up brings their positions to the last segment with the row's next deep token.
        self.unchecked: list[list[int]] = [[] for _ in range(rows)]
        self.checked = np.zeros(rows, dtype=np.int64)  # exited tokens the final head has judged (monitor)
        self.agreed = np.zeros(rows, dtype=np.int64)  # of them, the ones it would have emitted too
        # Full mode's step (`full`): each segment's KV with where its plain graph's hidden state is among
        # its outputs (None: the last), where the final head's outputs are, and its token input per batch size.
        self._chain = [(kv, kv.graphs[PLAIN], kv.graphs[PLAIN].names.index("hidden_out") if spec.emits_hidden else None)
                       for spec, kv in zip(specs, self.kv)]
        names = self.kv[-1].graphs[PLAIN].names
        self._final_at = tuple(names.index(n) if n in names else None for n in ("token", "top_ids", "top_logits"))
        self._ids: dict[int, np.ndarray] = {}
        # Early exit's own step (`early`) needs the first segment's graph with its head inside, ending at
        # an exit that deeper segments follow, and takes ids; the monitor's and a split's bookkeeping
        # (checks, fallbacks) are `step`'s.
        first = self.kv[0]
        with_head = first.graphs[WITH_HEAD].names if first.has(WITH_HEAD) else ()
        self.can_exit_early = (len(self.kv) > 1 and specs[0].takes_ids and not monitor and tail is None
                               and all(n in with_head for n in ("hidden_out", "exit_token", "exit_scores")))
        self._early_at = tuple(with_head.index(n) for n in ("hidden_out", "exit_token", "exit_scores")) \
            if self.can_exit_early else None
        # Sampled rows need the top tokens of whichever head decides: the first exit's inside its
        # segment's graph, and every deeper head's (older artifacts' heads lack them: `step` then).
        self.can_sample_early = self.can_exit_early and "exit_top_ids" in with_head and None not in self._final_at
        self._early_tops = tuple(with_head.index(n) for n in ("exit_top_ids", "exit_top_logits")) \
            if self.can_sample_early else None

    def length(self, slot: int) -> int:
        """Positions the row has fed (the first segment's KV: it runs every position)."""
        return int(self.kv[0].lengths[slot])

    def release(self, slot: int) -> None:
        """Forget a row: its slot takes another sequence."""
        for kv in self.kv:
            kv.reset(slot)
        self.unchecked[slot] = []
        self.checked[slot] = self.agreed[slot] = 0
        self.boundary[slot], self.sent[slot], self.sessions[slot] = None, 0, ""

    def move(self, src: int, dst: int) -> None:
        """Move a row to a free slot (`Engine` keeps live rows together: one call covers them)."""
        for kv in self.kv:
            kv.move(src, dst)
        self.unchecked[dst], self.unchecked[src] = self.unchecked[src], []
        self.checked[dst], self.agreed[dst] = self.checked[src], self.agreed[src]
        self.checked[src] = self.agreed[src] = 0
        self.boundary[dst], self.sent[dst], self.sessions[dst] = self.boundary[src], self.sent[src], self.sessions[src]
        self.boundary[src], self.sent[src], self.sessions[src] = None, 0, ""

    def prefill(self, slots: Sequence[int], prompts: Sequence[Sequence[int]],
                sample: bool | Sequence[bool] = False) -> list[StepResult]:
        """Run each row's prompt (token ids) through every layer and predict the next token. Rows in
        neighbouring fresh slots run together: every position but the last in one right-padded call
        a segment, then the last positions as one step (the final head reads a call's last
        position, which padding would hide); a prompt never recomputes another's padding."""
        slots = list(slots)
        lengths = [len(p) for p in prompts]
        together = (len(slots) > 1 and slots == list(range(slots[0], slots[0] + len(slots)))
                    and all(self.length(s) == 0 for s in slots) and max(lengths) > 1)
        sample = list(sample) if isinstance(sample, (list, tuple)) else [sample] * len(slots)
        if not together:
            return [self.step([s], [p], sample=[w])[0] for s, p, w in zip(slots, prompts, sample)]
        seq = max(lengths) - 1
        x = np.zeros((len(slots), seq), dtype=np.int64)
        for i, p in enumerate(prompts):
            x[i, : len(p) - 1] = p[:-1]
        counts = [max(1, n - 1) for n in lengths]  # a one-token prompt computes one position, forgotten below
        for spec, kv in zip(self.specs, self.kv):
            outputs = kv.call(PLAIN, slots, x, counts)
            if spec.emits_hidden:
                x = outputs[0]
        for r, (slot, n) in enumerate(zip(slots, lengths)):
            if n == 1:
                for kv in self.kv:
                    kv.lengths[slot] = 0
            elif self.tail is not None:  # the server gets them with the row's first deep token
                self._keep(slot, x[r, : n - 1])
        return self.step(slots, [p[-1:] for p in prompts], sample=sample)

    def step(self, slots: Sequence[int], inputs: Sequence[Sequence[int] | np.ndarray],
             thresholds: Thresholds | Sequence[Thresholds] = None, metric: int = 0,
             trace: bool = False, sample: bool | Sequence[bool] = False) -> list[StepResult]:
        """Feed each row in ``slots`` its ``inputs`` (token ids) and predict its next token.

        ``thresholds`` maps exit layer -> minimum score of metric ``metric`` (an
        index into `ALL_METRICS`), one map for every row or one per row; an exit
        not in a row's map is passed without its head deciding (None: full mode).
        With the ``classifier`` metric the segment's own exit score decides first,
        and the head runs only for a token that leaves. ``trace`` runs the head of
        every asked exit whatever the scores and records them (calibration). ``sample``
        (for every row, or per row) copies the deciding head's top tokens and logits into the
        results, for drawing the token (`eec.runtime.sampling`).
        """
        slots = list(slots)
        n = len(slots)
        per_row = list(thresholds) if isinstance(thresholds, (list, tuple)) else [thresholds] * n
        sampled = list(sample) if isinstance(sample, (list, tuple)) else [sample] * n
        results = [StepResult(token=-1, exit_layer=-1) for _ in range(n)]
        if self.specs[0].takes_ids:  # ids, then [positions, hidden]
            xs = [np.asarray(ids, dtype=np.int64).reshape(-1) for ids in inputs]
        else:  # a split's server: its first segment takes the device's hidden states
            xs = [np.asarray(h, dtype=np.float32) for h in inputs]
        state = _Rows(slots, xs, per_row, metric, trace, sampled, results, [None] * n)
        return self._descend(state, 0, list(range(n)))

    def _descend(self, state: _Rows, first: int, going: list[int]) -> list[StepResult]:
        """`step` from segment ``first`` on, for the rows ``going`` (indices into ``state.slots``) whose
        inputs to that segment are in ``state.xs``; the other rows' results are already filled in."""
        slots, xs, per_row, results, sampled = state.slots, state.xs, state.thresholds, state.results, state.sampled
        metric, trace, previous = state.metric, state.trace, state.previous
        last = len(self.kv) - 1
        for j in range(first, last + 1):
            spec, kv = self.specs[j], self.kv[j]
            for i in going:
                self._catch_up(j, kv, slots[i], xs, i)
            layer = spec.exit.layer
            local_end = j == last and self.tail is None  # the final head ends this segment
            asked = [i for i in going if per_row[i] is not None and layer in per_row[i]] if not local_end else []
            role = WITH_HEAD if asked and kv.has(WITH_HEAD) else PLAIN
            # Exited rows ride the deeper rows' call (`_riders`); the propagating catch-up keeps their
            # positions for its fill graph, cheaper than the segment.
            riders = self._riders(kv, slots, results) if going and j > 0 and not self.propagate else []
            if riders:
                for i in riders:  # a row that left needs its own hidden state no more: its owed position goes in
                    xs[i], kv.pending[slots[i]] = kv.pending[slots[i]], None
                outputs = self._run(j, kv, role, slots, sorted(going + riders), xs)
                self._ridden(j, slots, riders, outputs)
            else:
                outputs = self._run(j, kv, role, slots, going, xs)
            if local_end:
                for i in going:
                    results[i].token, results[i].exit_layer = self._final(slots[i], outputs[i], spec, trace, results[i])
                    if sampled[i] and "top_ids" in outputs[i]:
                        results[i].top_ids = np.array(outputs[i]["top_ids"][0])
                        results[i].top_logits = np.array(outputs[i]["top_logits"][0])
                return results
            if spec.emits_hidden:
                for i in going:
                    xs[i] = outputs[i]["hidden_out"][0]
            if j == last:  # a split: what the device has is kept, and the rows that stay go to the server
                for i in going:
                    self._keep(slots[i], xs[i])
            leaving = []
            if asked:
                leaving = self._decide(state, j, role, asked, outputs)
            else:
                for i in going:
                    previous[i] = xs[i][-1]
            if j == last:
                for i in going:
                    if results[i].exit_layer < 0:
                        self._remote(j, slots[i], xs[i], per_row[i], metric, sampled[i], results[i])
                return results
            for i in leaving:  # copied by add_pending: a one-position call's outputs are overwritten by the next call
                self.kv[j + 1].add_pending(slots[i], xs[i])
                if self.monitor:
                    self.unchecked[slots[i]].append(results[i].token)
            going = [i for i in going if results[i].exit_layer < 0]
        raise AssertionError("unreachable: the last segment always returns")

    def _last_tokens(self, slots: Sequence[int], tokens: Sequence[int]) -> tuple[np.ndarray, bool]:
        """The rows' tokens in this batch size's own [rows, 1] array (the calls bind it once), and
        whether the rows form one block in order, as the engine keeps them (one call's binding)."""
        rows = len(slots)
        x = self._ids.get(rows)
        if x is None:
            x = self._ids[rows] = np.zeros((rows, 1), dtype=np.int64)
        if rows == 1:
            x[0, 0] = tokens[0]
            return x, True
        x[:, 0] = tokens
        return x, all(b == a + 1 for a, b in zip(slots, slots[1:]))

    def full(self, slots: Sequence[int], tokens: Sequence[int]) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """Full mode's step, a strategy of its own: each row's last token through every segment, one
        call a segment over all the rows, nothing else. Returns the final head's ``token`` ([rows])
        and its ``top_ids`` and ``top_logits`` ([rows, k], None where the head lacks them), the call's
        own arrays: the next step overwrites them. Rows in full mode never leave, so they have no
        pending positions, no riders, no decisions or traces to make: `step` does that work for every
        mode, and at batch 1 its bookkeeping was the host time that separated eec's decode loop from
        a minimal one (`bench/step_host.py`). Not for a split's device part (`tail`)."""
        x, block = self._last_tokens(slots, tokens)
        for kv, graph, hidden in self._chain:
            outputs = kv.block_step(graph, slots[0], x) if block and kv.shared else kv.call(PLAIN, slots, x)
            if hidden is not None:
                x = outputs[hidden]
        token, top_ids, top_logits = self._final_at
        return outputs[token], (outputs[top_ids] if top_ids is not None else None), (
            outputs[top_logits] if top_logits is not None else None)

    def early(self, slots: Sequence[int], tokens: Sequence[int], thresholds: Sequence[Thresholds], metric: int,
              sample: Sequence[bool] | None = None) -> tuple[np.ndarray, np.ndarray, list | None]:
        """Early exit's step, a strategy of its own: `step`'s tokens and exits for ``metric``, one of
        the heads' scores (`can_exit_early`). The first segment runs over every row in one call with
        its head inside, and the rows leave or stay as arrays; only when a row stays does the step go
        on as `step` does (catch-ups, riders, deeper exits), from the second segment. Most steps end
        at the first exit, and there the general step's per-row objects and dicts were host time: on
        the same sessions this step takes 7-10% off the step at batch 1 (one row decides with Python
        numbers) and 4-7% at batch 8 (code model, 0.2 and 0.65 ms steps). Returns each row's token
        and the layers it passed through (arrays, or lists of one), and with ``sample`` (per row;
        `can_sample_early`) each sampled row's deciding head's top token ids and logits (None for the
        others; None in all for greedy rows)."""
        rows = len(slots)
        x, block = self._last_tokens(slots, tokens)
        kv = self.kv[0]
        if block and kv.shared:
            outputs = kv.block_step(kv.graphs[WITH_HEAD], slots[0], x)
        else:
            outputs = kv.call(WITH_HEAD, slots, x)
        at_hidden, at_token, at_scores = self._early_at
        hidden, layer = outputs[at_hidden], self.specs[0].exit.layer  # hidden: [rows, 1, size]
        if rows == 1 and not sample:  # one greedy sequence: Python scalars, no array arithmetic (~10 µs a step)
            t = thresholds[0]
            if float(outputs[at_scores][0, metric]) >= (np.inf if t is None else t.get(layer, np.inf)):
                self.kv[1].add_pending(slots[0], hidden[0])
                return [int(outputs[at_token][0])], [layer], None
            leave = np.zeros(1, dtype=bool)
        else:
            limits = np.array([np.inf if t is None else t.get(layer, np.inf) for t in thresholds])
            leave = outputs[at_scores][:, metric] >= limits  # a row not asking this exit stays (inf)
        out_tokens = np.array(outputs[at_token], dtype=np.int64).reshape(rows)
        layers = np.full(rows, layer, dtype=np.int64)
        tops = None
        if sample is not None and any(sample):  # copied: a deeper call of this graph would overwrite them
            ids, logits = (np.array(outputs[k]) for k in self._early_tops)
            tops = [(ids[r], logits[r]) if sample[r] and leave[r] else None for r in range(rows)]
        if leave.any():
            self.kv[1].pending.add_rows(np.asarray(slots)[leave], hidden[leave, 0])
        if leave.all():
            return out_tokens, layers, tops
        sampled = [False] * rows if tops is None else list(sample)
        results = [StepResult(token=int(out_tokens[r]), exit_layer=layer if leave[r] else -1) for r in range(rows)]
        xs = [np.array(h) for h in hidden]  # the next call may overwrite the outputs
        going = np.flatnonzero(~leave).tolist()
        self._descend(_Rows(list(slots), xs, list(thresholds), metric, False, sampled, results,
                            [h[-1] for h in xs]), 1, going)
        for r in going:
            out_tokens[r], layers[r] = results[r].token, results[r].exit_layer
            if sampled[r]:
                tops[r] = results[r].top_ids, results[r].top_logits
        return out_tokens, layers, tops

    def _riders(self, kv: SegmentKV, slots: list[int], results: list[StepResult]) -> list[int]:
        """Rows that left at an earlier exit this step and owe this segment exactly one position: they
        ride the call the deeper rows make anyway. At batch > 1 a segment's call costs about the same
        with a few more rows (one-position rows share it), while a row's catch-up of several positions
        later runs alone (GroupQueryAttention takes several positions after a past for one row only):
        on the code model at batch 8 the deferred catch-ups made 4.2 calls a step against full mode's
        1. A ridden position is one the exact catch-up would compute when the row next went deeper,
        so the KV and tokens are the same; only a row that ends before going deeper again pays for
        positions it would never have run."""
        return [i for i, (slot, r) in enumerate(zip(slots, results))
                if r.exit_layer >= 0 and kv.pending[slot] is not None and len(kv.pending[slot]) == 1]

    def _ridden(self, j: int, slots: list[int], riders: list[int], outputs: dict[int, dict[str, np.ndarray]]) -> None:
        """A rider's output goes on as the next segment's pending position, to the split's kept states
        at the last local segment, or, at the final head, to the monitor's check of its exited token."""
        last = len(self.kv) - 1
        for i in riders:
            slot = slots[i]
            if j == last and self.tail is None:
                if self.monitor and self.unchecked[slot]:
                    final = int(np.asarray(outputs[i]["token"]).reshape(-1)[-1])
                    self.checked[slot] += 1
                    self.agreed[slot] += int(final == self.unchecked[slot].pop(0))
                continue
            hidden = np.array(outputs[i]["hidden_out"][0])  # copied: the next call reuses the output arrays
            if j == last:
                self._keep(slot, hidden)
            else:
                self.kv[j + 1].add_pending(slot, hidden)

    def _remote(self, j: int, slot: int, x: np.ndarray, thresholds: Thresholds, metric: int, sample: bool,
                result: StepResult) -> None:
        """A row that did not leave on the device: the server runs the positions it lacks (the exited ones
        since its last call, then this one) and answers with the token; if it lacks more than was sent (it
        restarted), they are sent again from where it stands; if it does not answer, the device's own last
        exit decides and the token is flagged."""
        layer = self.specs[j].exit.layer
        deeper = None if thresholds is None else {k: v for k, v in thresholds.items() if k > layer}
        if not self.sessions[slot]:
            self.sessions[slot] = new_session()
        for _ in range(2):
            start = int(self.sent[slot])
            hidden = self.boundary[slot].since(start)
            try:
                answer = self.tail.run(self.sessions[slot], start, hidden, deeper, metric, sample)
            except TailBehind as behind:
                if not 0 <= behind.length <= start:
                    raise
                self.sent[slot] = behind.length
                continue
            except TailUnavailable:
                break
            self.sent[slot] = start + len(hidden)
            result.token, result.exit_layer = answer.token, answer.exit_layer
            result.top_ids, result.top_logits = answer.top_ids, answer.top_logits
            return
        head = self.heads[j]
        token, _ = head(x[-1:][None])
        result.token, result.exit_layer, result.fallback = int(token), layer, True
        if sample and head.k:
            result.top_ids, result.top_logits = np.array(head.top_ids[0]), np.array(head.top_logits[0])

    def _keep(self, slot: int, hidden: np.ndarray) -> None:
        if self.boundary[slot] is None:
            self.boundary[slot] = Positions(hidden.shape[-1])
        self.boundary[slot].add(hidden)

    def _catch_up(self, j: int, kv: SegmentKV, slot: int, xs: list[np.ndarray], i: int) -> None:
        pending = kv.pending[slot]
        if pending is None:
            return
        kv.pending[slot] = None
        if not self.propagate:
            xs[i] = np.concatenate([pending, xs[i]])
            return
        kv.call(FILL, [slot], pending[None])
        if j + 1 < len(self.kv):
            self.kv[j + 1].add_pending(slot, pending)

    def _run(self, j: int, kv: SegmentKV, role: str, slots: list[int], going: list[int],
             xs: list[np.ndarray]) -> dict[int, dict[str, np.ndarray]]:
        """One segment's calls for the rows ``going``: one over the rows that add one position, one
        per row that adds several (a catch-up); or, where that takes fewer calls, `_rounds`.
        Returns each row's outputs by name, batch dimension 1."""
        out: dict[int, dict[str, np.ndarray]] = {}
        singles = [i for i in going if len(xs[i]) == 1]
        several = [i for i in going if len(xs[i]) > 1]
        if several and not self.monitor and max(len(xs[i]) for i in several) < len(several) + bool(singles):
            return self._rounds(kv, role, slots, going, xs)
        if singles:
            x = xs[singles[0]][None] if len(singles) == 1 else np.stack([xs[i] for i in singles])
            outputs = kv.call(role, [slots[i] for i in singles], x)
            names = kv.graphs[role].names
            if len(singles) == 1:
                out[singles[0]] = dict(zip(names, outputs))
            else:
                for r, i in enumerate(singles):
                    out[i] = {name: o[r: r + 1] for name, o in zip(names, outputs)}
        last = len(self.kv) - 1
        for i in going:
            if len(xs[i]) > 1:
                slot = slots[i]
                verify = j == last and self.monitor and bool(self.unchecked[slot])
                graph = VERIFY if verify else role
                out[i] = dict(zip(kv.graphs[graph].names, kv.call(graph, [slot], xs[i][None])))
        return out

    def _rounds(self, kv: SegmentKV, role: str, slots: list[int], going: list[int],
                xs: list[np.ndarray]) -> dict[int, dict[str, np.ndarray]]:
        """The rows' positions one at a time, every row that has one left in each call: right-aligned,
        so that the last call carries every row's current position (and runs the head). A row's
        catch-up of n positions joins the batch in n one-position calls instead of running alone:
        GroupQueryAttention takes several rows only at one position each. Each position's KV is
        what one-position decoding computes, as in full mode."""
        depth = max(len(xs[i]) for i in going)
        hidden: dict[int, list[np.ndarray]] = {i: [] for i in going}
        out: dict[int, dict[str, np.ndarray]] = {}
        for r in range(depth):
            taking = [i for i in going if r >= depth - len(xs[i])]
            graph = role if r == depth - 1 else PLAIN  # a head matters at the current position only
            x = np.stack([xs[i][r - depth + len(xs[i])][None] for i in taking])
            outputs = dict(zip(kv.graphs[graph].names, kv.call(graph, [slots[i] for i in taking], x)))
            for k, i in enumerate(taking):
                if "hidden_out" in outputs:
                    hidden[i].append(np.array(outputs["hidden_out"][k: k + 1]))
                if r == depth - 1:
                    out[i] = {name: np.array(o[k: k + 1]) for name, o in outputs.items()}
        for i in going:
            if hidden[i]:
                out[i]["hidden_out"] = np.concatenate(hidden[i], axis=1)
        return out

    def _final(self, slot: int, outputs: dict[str, np.ndarray], spec: SegmentSpec, trace: bool,
               result: StepResult) -> tuple[int, int]:
        """The final head's token from the last segment's outputs; the monitor's check where it ran."""
        tokens = np.asarray(outputs["token"]).reshape(-1)
        unchecked = self.unchecked[slot]
        if self.monitor and unchecked and len(tokens) > 1:  # the verify graph: a token per position
            final = tokens[-1 - len(unchecked): -1]
            self.checked[slot] += len(unchecked)
            self.agreed[slot] += int(np.sum(final == np.asarray(unchecked)))
        self.unchecked[slot] = []
        token, layer = int(tokens[-1]), spec.exit.layer
        if trace:  # the final head has no confidence scores (artifacts before eec 0.2 had)
            scores = outputs["scores"][0] if "scores" in outputs else np.full(len(GRAPH_METRICS), np.nan)
            result.exit_tokens[layer], result.scores[layer] = token, np.append(scores, [np.nan, np.nan])
        return token, layer

    def _decide(self, state: _Rows, j: int, role: str, asked: list[int],
                outputs: dict[int, dict[str, np.ndarray]]) -> list[int]:
        """The rows of ``asked`` that leave at segment ``j``'s exit (their results filled in)."""
        xs, previous, per_row, results = state.xs, state.previous, state.thresholds, state.results
        metric, trace, sampled = state.metric, state.trace, state.sampled
        spec, layer = self.specs[j], self.specs[j].exit.layer
        gates = {i: float(outputs[i]["exit_score"][0]) if spec.scores_exit else np.nan for i in asked}
        judged = asked
        if metric == CLASSIFIER and not trace:  # the classifier says stay: the head's projection never runs
            judged = [i for i in asked if gates[i] >= per_row[i][layer]]
        heads: dict[int, tuple[int, np.ndarray]] = {}
        tops: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # the top tokens of sampled rows
        if role == WITH_HEAD:  # the head ran inside the segment's call
            for i in judged:
                heads[i] = int(outputs[i]["exit_token"][0]), outputs[i]["exit_scores"][0]
                if sampled[i] and "exit_top_ids" in outputs[i]:
                    tops[i] = outputs[i]["exit_top_ids"][0], outputs[i]["exit_top_logits"][0]
        elif judged:
            if len(judged) == 1:
                hidden = outputs[judged[0]]["hidden_out"]
            else:
                hidden = np.stack([xs[i][-1:] for i in judged])
            head = self.heads[j]
            tokens, scores = head.batch(hidden)
            for r, i in enumerate(judged):
                heads[i] = int(tokens[r]), scores[r]
                if sampled[i] and head.k:
                    tops[i] = head.top_ids[r], head.top_logits[r]
        leaving = []
        for i in asked:
            current = xs[i][-1]
            if i not in heads:
                previous[i] = current
                continue
            token, head_scores = heads[i]
            if metric < len(GRAPH_METRICS):
                value = float(head_scores[metric])
            elif metric == CLASSIFIER:
                value = gates[i]
            else:  # the cosine with the previous exit's hidden state; none at the first exit
                value = np.nan if previous[i] is None else cosine(current, previous[i])
            if trace:
                row = np.full(len(GRAPH_METRICS) + 2, np.nan, dtype=np.float32)
                row[: len(GRAPH_METRICS)], row[-1] = head_scores, gates[i]
                if previous[i] is not None:
                    row[COSINE] = cosine(current, previous[i])
                results[i].exit_tokens[layer], results[i].scores[layer] = token, row
                results[i].hidden[layer] = np.array(current)
            previous[i] = current
            if value >= per_row[i][layer]:
                results[i].token, results[i].exit_layer = token, layer
                if i in tops:
                    results[i].top_ids, results[i].top_logits = np.array(tops[i][0]), np.array(tops[i][1])
                leaving.append(i)
        return leaving


class Decoder:
    """A `Batch` of one sequence, stepped with [1, n] arrays of ids."""

    def __init__(self, batch: Batch):
        self.batch = batch

    @property
    def states(self) -> list[SegmentKV]:
        return self.batch.kv

    @property
    def specs(self) -> list[SegmentSpec]:
        return self.batch.specs

    @property
    def heads(self) -> list[HeadCall | None]:
        return self.batch.heads

    @property
    def checked(self) -> int:
        return int(self.batch.checked[0])

    @property
    def agreed(self) -> int:
        return int(self.batch.agreed[0])

    def step(self, ids: np.ndarray, thresholds: Thresholds, metric: int = 0, trace: bool = False) -> StepResult:
        """Feed ``ids`` ([1, n] int64) and predict the next token (`Batch.step`)."""
        return self.batch.step([0], [np.asarray(ids).reshape(-1)], thresholds, metric, trace)[0]
