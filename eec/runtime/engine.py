"""Continuous batching: many requests decoded together, each leaving at its own exit.

An `Engine` owns one `eec.runtime.core.Batch` of ``max_batch`` rows. Between
steps it admits waiting requests into free rows (up to ``max_batch`` and a KV
budget) and prefills them together; each step then feeds every running row
its last token, and each row leaves at the first exit whose confidence reaches
that request's own threshold (the batch shrinks at every exit); finished
requests (end of sequence, a stop string, ``max_new_tokens``, the context)
are retired and their rows given to the next. Live rows are kept in the
first slots, so one call covers them: a retired row's slot takes the last
live row (`Batch.move`). A step runs the strategy its rows' modes allow: full
mode's own (`Batch.full`) when every row is in full mode, early exit's own
(`Batch.early`) when the confidence comes from the heads' scores, greedy or
sampled, and the general `Batch.step` otherwise (the classifier and cosine
metrics, the monitor, a split's device).

A request can be cancelled from any thread (`Request.cancel`, a client gone):
its row and KV are released before the next step. ``max_waiting`` bounds the
queue: past it `submit` raises `eec.errors.Overloaded` rather than letting the
queue (and every waiting request's latency) grow without bound.

Requests come from any thread (`submit`); the engine runs in the caller's
thread (`step`, `run`) or in one worker thread of its own (`start`). All
onnxruntime calls happen in that one thread: an IO binding is not for two
threads at once.
"""

from __future__ import annotations

import functools
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator, Mapping

from eec.calib.metrics import GRAPH_METRICS
from eec.errors import EecError, InputError, Overloaded

if TYPE_CHECKING:
    import numpy as np

    from eec.runtime.core import StepResult
    from eec.runtime.model import EarlyExitModel, GenerationResult, Stats
    from eec.runtime.options import GenerationOptions
    from eec.runtime.sampling import Sampling
    from eec.runtime.text import PieceDecoder


@dataclass
class Event:
    """One token of one request, as it is produced (``generate(prompts, stream=True)``)."""

    index: int  # the request's position in the list given to `generate`, or its submission number
    token: int
    exit_layer: int
    text: str | None  # the new text this token completes ("" while a character waits for its other bytes,
    # or while the text could be the start of a stop string)
    finish_reason: str | None = None  # set on a request's last event: "stop", "length" or "cancelled"
    fallback: bool = False  # split: the server did not answer; the device's last exit decided this token


@dataclass(eq=False)  # a request is itself, not its fields: kept in sets by the server
class Request:
    """A prompt and its options, and what decoding it has produced so far; `result` waits for the end."""

    index: int
    ids: list[int]
    max_new_tokens: int
    thresholds: Mapping[int, float] | None  # None: full mode
    eos: frozenset[int]
    metric: int = 0  # the confidence metric the thresholds apply to (an index into `ALL_METRICS`)
    stop: tuple[str, ...] = ()
    stream: bool = False
    sampling: "Sampling | None" = None  # None: greedy
    rng: "np.random.Generator | None" = None
    tokens: list[int] = field(default_factory=list)
    exits: list[int] = field(default_factory=list)
    fallbacks: list[int] = field(default_factory=list)  # split: indices of tokens the device decided alone
    text: str = ""
    finish_reason: str | None = None
    stats: "Stats | None" = None
    error: BaseException | None = None
    piece: str | None = None  # the text the last token streamed (`Event.text`)
    _decoder: "PieceDecoder | None" = None  # with a tokenizer: each token's text
    _sent: int = 0  # characters of ``text`` streamed
    _done: threading.Event = field(default_factory=threading.Event)
    _events: "queue.SimpleQueue[Event | None] | None" = None  # or anything with put(): each event, then None
    _cancelled: bool = False
    _engine: "Engine | None" = None  # the engine that queued it, told of a cancel

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def cancel(self) -> None:
        """Stop decoding this request (from any thread): before the engine's next step it leaves the batch,
        its KV rows are freed, and it finishes with ``finish_reason="cancelled"``."""
        self._cancelled = True
        if self._engine is not None:
            self._engine._cancels = True

    def choose(self, result: "StepResult") -> int:
        """The token of a step: the head's own, or drawn from its top tokens when sampling."""
        if self.sampling is None:
            return result.token
        return self.sampling.draw(result.top_ids, result.top_logits, self.rng)

    def accept(self, token: int, layer: int, elapsed: float, room: bool = True, fallback: bool = False) -> Event:
        """Record a produced token (``elapsed``: the decode time it took; ``room``: whether the
        context has room for another; ``fallback``: a split's server did not answer for it) and say
        whether the request is finished."""
        stats = self.stats
        if fallback:
            self.fallbacks.append(len(self.tokens))
            stats.fallbacks += 1
        self.tokens.append(token)
        self.exits.append(layer)
        stats.new_tokens += 1
        stats.decode_s += elapsed
        stats.exits[layer] = stats.exits.get(layer, 0) + 1
        piece = None
        if self._decoder is not None and self._pieces:
            piece = self._decoder(token)
            self.text += piece
        cut = False  # by a stop string: the text ends before it
        if token in self.eos:
            self.finish_reason = "stop"
        elif self.stop and piece and self._stopped(len(piece)):
            self.finish_reason, cut = "stop", True
        elif len(self.tokens) >= self.max_new_tokens or not room:
            self.finish_reason = "length"
            stats.context_full = len(self.tokens) < self.max_new_tokens  # "length" either way: say which
        if self.finish_reason and piece is not None and not cut:
            self.text += self._decoder.rest(self.tokens, self.text)  # a split character's bytes still waiting
        elif self.finish_reason:
            self._decoded()
        self.piece = self._emit() if piece is not None else None
        event = Event(self.index, token, layer, self.piece, self.finish_reason, fallback)
        if self._events is not None:
            self._events.put(event)
        return event

    @functools.cached_property
    def _longest_stop(self) -> int:
        return max(len(s) for s in self.stop)

    def _emit(self) -> str:
        """The text not streamed yet, less what could still begin a stop string (held back until the
        next token says whether it does: a stream never shows a stop string, or part of one)."""
        end = len(self.text)
        if not self.finish_reason and self.stop:
            end = max(self._sent, end - self._longest_stop + 1)
        piece, self._sent = self.text[self._sent: end], end
        return piece

    def _stopped(self, new: int) -> bool:
        """Whether a stop string ends in the text the last piece completed; the text is cut before it."""
        window = len(self.text) - new - self._longest_stop + 1
        for stop in self.stop:
            at = self.text.find(stop, max(0, window))
            if at >= 0:
                self.text = self.text[:at]
                return True
        return False

    @property
    def _pieces(self) -> bool:
        """Whether each token's text is wanted as it comes: streamed, or watched for stop strings.
        Otherwise the text is decoded once, when the request ends (`_decoded`): a tokenizer call per
        token and row is host time between two steps of the whole batch."""
        return self.stream or self._events is not None or bool(self.stop)

    def _decoded(self) -> None:
        """The whole text of a request whose text was not decoded piece by piece."""
        if self._decoder is not None and not self._pieces:
            self.text = self._decoder.rest(self.tokens, "")

    def result(self, timeout: float | None = None) -> "GenerationResult":
        """Wait for the request to finish and return its `GenerationResult`."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.index} did not finish within {timeout} s")
        if self.error is not None:
            raise self.error
        return self.as_result()

    def as_result(self) -> "GenerationResult":
        """What the request has produced, as a `GenerationResult`."""
        from eec.runtime.model import GenerationResult

        return GenerationResult(tokens=list(self.tokens), exits=list(self.exits),
                                text=self.text if self._decoder is not None else None,
                                finish_reason=self.finish_reason, stats=self.stats, fallbacks=list(self.fallbacks))

    def events(self) -> Iterator[Event]:
        """The request's events as they come (submitted with ``stream=True``), from any thread."""
        if self._events is None:
            raise InputError("this request was not submitted with stream=True")
        while True:
            event = self._events.get()
            if event is None:
                if self.error is not None:
                    raise self.error
                return
            yield event


class Engine:
    """Decodes submitted requests together (see the module's docstring)."""

    def __init__(self, model: "EarlyExitModel", *, max_batch: int = 8, kv_budget: int | None = None,
                 metric: str | None = None, catch_up: str | None = None, monitor: bool = False, capacity: int = 256,
                 early_exit: bool = True, max_waiting: int | None = None):
        """``max_batch``: rows decoded at once; ``kv_budget``: positions (prompt plus new tokens) the
        running requests may reserve together, by default every row at the full context; ``metric``:
        the confidence metric every request's thresholds apply to (by default the calibration's);
        ``catch_up``, ``monitor``: as `EarlyExitModel.generate`; ``capacity``: positions each row's KV
        buffers start with (they grow by doubling); ``early_exit=False``: every request runs in full
        mode, so the segments' graphs with their heads inside are never opened; ``max_waiting``: requests
        that may wait for a row (None: no bound), past which `submit` raises `Overloaded`."""
        from eec.runtime.model import Stats

        if not isinstance(max_batch, int) or isinstance(max_batch, bool) or max_batch < 1:
            raise InputError(f"max_batch must be a whole number of at least 1, got {max_batch!r}")
        context = model.manifest.model.context_length
        self.model, self.rows, self.metric_name = model, max_batch, metric
        self.metric = model.metric_id(metric)
        self.kv_budget = max_batch * context if kv_budget is None else kv_budget
        if not isinstance(self.kv_budget, int) or self.kv_budget < 2:
            raise InputError(f"kv_budget must be a whole number of positions, got {kv_budget!r}")
        if max_waiting is not None and (not isinstance(max_waiting, int) or max_waiting < 0):
            raise InputError(f"max_waiting must be a whole number of requests, got {max_waiting!r}")
        self.max_waiting = max_waiting
        self.batch = model.new_batch(max_batch, min(capacity, context), catch_up, early_exit=early_exit, monitor=monitor)
        # Full mode's own step (`Batch.full`) serves a step whose rows are all in full mode; not a split's
        # device, whose last layers answer from a server.
        self._full, self._layers = self.batch.tail is None, self.batch.specs[-1].exit.layer
        # Early exit's own step (`Batch.early`) serves rows whose metric is one of the heads' scores: greedy
        # ones, and sampled ones where the heads return their top tokens.
        self._early = self.batch.can_exit_early and self.metric < len(GRAPH_METRICS)
        self._sample_early = self._early and self.batch.can_sample_early
        self._context = context
        self.monitor = monitor
        self._stats = Stats
        self.slots: list[Request | None] = [None] * max_batch
        self.live = 0  # rows 0..live-1 hold running requests
        self._waiting: deque[Request] = deque()
        self._lock = threading.Condition()
        self._submitted = 0
        self._worker: threading.Thread | None = None
        self._closing = False
        self._cancels = False  # a request was cancelled since the last step looked (`_drop_cancelled`)
        self._ended = False  # a running request finished since the last `_retire`

    # -- requests --------------------------------------------------------------------------------

    def submit(self, prompt, options: "GenerationOptions | None" = None, *, index: int | None = None,
               stream: bool = False, sink=None, **changes) -> Request:
        """Queue a prompt (text or token ids) with ``options`` (`eec.runtime.options.GenerationOptions`,
        ``mode`` "full" or "early-exit") and ``changes`` to its fields by name; returns its `Request`.
        ``stream``, ``sink``: as `EarlyExitModel.make_request`; ``index``: the number its events carry (by
        default the submission's). Safe from any thread. Bad input raises here, before anything is queued;
        a full queue raises `Overloaded`."""
        from eec.runtime.options import GenerationOptions

        options = GenerationOptions.of(options, changes)
        with self._lock:
            index = self._submitted if index is None else index
            self._submitted += 1
        request = self.model.make_request(prompt, options, index=index, metric=self.metric_name, stream=stream,
                                          sink=sink)
        if len(request.ids) + 1 > self.kv_budget:
            raise InputError(f"the prompt is {len(request.ids)} tokens; this engine's KV budget is {self.kv_budget}")
        with self._lock:
            if self._closing:
                raise EecError("this engine is closed")
            if self.max_waiting is not None and len(self._waiting) >= self.max_waiting:
                raise Overloaded(f"{len(self._waiting)} requests are waiting already; try again later")
            request._engine = self
            self._waiting.append(request)
            self._lock.notify_all()
        return request

    @property
    def busy(self) -> bool:
        return self.live > 0 or bool(self._waiting)

    @property
    def waiting(self) -> int:
        """Requests queued for a row."""
        return len(self._waiting)

    # -- the loop --------------------------------------------------------------------------------

    def step(self) -> list[tuple[Request, Event]]:
        """Admit what fits, prefill it, decode one token for every running row, retire what finished.
        Returns the events produced, in row order. Runs in one thread at a time."""
        events: list[tuple[Request, Event]] = []
        if self._cancels:
            self._drop_cancelled()
        running = list(range(self.live))  # rows that had their prefill before this step
        # Read without the lock: a request arriving now waits a step.
        admitted = self._admit() if self._waiting and self.live < self.rows else None
        if admitted:
            start = time.perf_counter()
            results = self.batch.prefill(admitted, [self.slots[s].ids for s in admitted],
                                         [self.slots[s].sampling is not None for s in admitted])
            elapsed = time.perf_counter() - start
            for slot, result in zip(admitted, results):
                request = self.slots[slot]
                request.stats.prefill_s = elapsed
                events.append(self._emit(request, request.choose(result), result.exit_layer, 0.0, result.fallback))
        if running and self._full and all(self.slots[s].thresholds is None for s in running):
            self._step_full(running, events)
        elif running and self._early and (
                self._sample_early or all(self.slots[s].sampling is None for s in running)):
            self._step_early(running, events)
        elif running:
            start = time.perf_counter()
            results = self.batch.step(running, [[self.slots[s].tokens[-1]] for s in running],
                                      [self.slots[s].thresholds for s in running], self.metric,
                                      sample=[self.slots[s].sampling is not None for s in running])
            elapsed = time.perf_counter() - start
            for slot, result in zip(running, results):
                request = self.slots[slot]
                events.append(self._emit(request, request.choose(result), result.exit_layer, elapsed, result.fallback))
        if self._ended:
            self._retire()
        return events

    def _step_full(self, running: list[int], events: list) -> None:
        """A step of rows that are all in full mode: `Batch.full`, and each row's token accepted."""
        slots = self.slots
        start = time.perf_counter()
        tokens, top_ids, top_logits = self.batch.full(running, [slots[s].tokens[-1] for s in running])
        elapsed = time.perf_counter() - start
        for r, slot in enumerate(running):
            request = slots[slot]
            token = int(tokens[r]) if request.sampling is None else request.sampling.draw(
                top_ids[r], top_logits[r], request.rng)
            events.append(self._emit(request, token, self._layers, elapsed))

    def _step_early(self, running: list[int], events: list) -> None:
        """A step of rows whose confidence score comes from the heads: `Batch.early`."""
        slots = self.slots
        sample = [slots[s].sampling is not None for s in running]
        start = time.perf_counter()
        tokens, layers, tops = self.batch.early(running, [slots[s].tokens[-1] for s in running],
                                                [slots[s].thresholds for s in running], self.metric,
                                                sample if any(sample) else None)
        elapsed = time.perf_counter() - start
        for r, slot in enumerate(running):
            request = slots[slot]
            token = int(tokens[r]) if request.sampling is None else request.sampling.draw(*tops[r], request.rng)
            events.append(self._emit(request, token, int(layers[r]), elapsed))

    def run(self) -> None:
        """Step until nothing is running or waiting (in the caller's thread)."""
        while self.busy:
            self.step()

    def start(self) -> "Engine":
        """Decode in a worker thread of its own from now on, as requests arrive; `close` stops it."""
        if self._worker is None:
            self._worker = threading.Thread(target=self._serve, name="eec-engine", daemon=True)
            self._worker.start()
        return self

    def close(self) -> None:
        """Stop the worker once the requests already submitted are done."""
        with self._lock:
            self._closing = True
            self._lock.notify_all()
        if self._worker is not None:
            self._worker.join()
            self._worker = None

    def __enter__(self) -> "Engine":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def _serve(self) -> None:
        while True:
            with self._lock:
                while not self.busy and not self._closing:
                    self._lock.wait()
                if not self.busy and self._closing:
                    return
            try:
                self.step()
            except BaseException as e:  # noqa: BLE001 - every request in flight learns of it
                self._fail(e)

    def _fail(self, error: BaseException) -> None:
        with self._lock:
            requests = [r for r in self.slots if r is not None] + list(self._waiting)
            self._waiting.clear()
        for slot in range(self.rows):
            if self.slots[slot] is not None:
                self.batch.release(slot)
                self.slots[slot] = None
        self.live = 0
        for request in requests:
            request.error = error
            self._finish(request)

    # -- rows ------------------------------------------------------------------------------------

    def _drop_cancelled(self) -> None:
        """Finish cancelled requests: waiting ones leave the queue, running ones their rows (`_retire`).
        `step` calls it only when a request was cancelled since the last look: nothing to scan otherwise."""
        with self._lock:
            self._cancels = False
            gone = [r for r in self._waiting if r._cancelled]
            if gone:
                self._waiting = deque(r for r in self._waiting if not r._cancelled)
        for request in gone:
            request.finish_reason = "cancelled"
            self._finish(request)
        for request in self.slots[: self.live]:
            if request._cancelled and request.finish_reason is None:
                request.finish_reason = "cancelled"
        self._retire()

    def _admit(self) -> list[int]:
        """Move waiting requests into the free rows after the live ones, while they fit (`step` calls it
        only when a request waits and a row is free)."""
        reserved = sum(len(r.ids) + r.max_new_tokens for r in self.slots[: self.live])
        admitted = []
        with self._lock:
            while self._waiting and self.live < self.rows:
                request = self._waiting[0]
                need = min(len(request.ids) + request.max_new_tokens, self.model.manifest.model.context_length)
                if admitted or self.live:
                    if reserved + need > self.kv_budget:
                        break
                self._waiting.popleft()
                reserved += need
                slot = self.live
                self.slots[slot] = request
                request.stats = self._stats(prompt_tokens=len(request.ids))
                self.live += 1
                admitted.append(slot)
        return admitted

    def _emit(self, request: Request, token: int, layer: int, elapsed: float,
              fallback: bool = False) -> tuple[Request, Event]:
        # A sequence (prompt and new tokens) holds at most the context, as transformers counts it.
        room = len(request.ids) + len(request.tokens) + 1 < self._context
        event = request.accept(token, layer, elapsed, room, fallback)
        if event.finish_reason is not None:
            self._ended = True
        return request, event

    def _retire(self) -> None:
        self._ended = False
        slot = 0
        while slot < self.live:
            request = self.slots[slot]
            if request.finish_reason is None:
                slot += 1
                continue
            if self.monitor:
                request.stats.checked = int(self.batch.checked[slot])
                request.stats.agreed = int(self.batch.agreed[slot])
            self.batch.release(slot)
            last = self.live - 1
            if slot != last:
                self.batch.move(last, slot)
                self.slots[slot] = self.slots[last]
            self.slots[last] = None
            self.live -= 1
            self._finish(request)

    @staticmethod
    def _finish(request: Request) -> None:
        if request.finish_reason in (None, "cancelled"):  # ended without `accept`'s last token: failed, cancelled
            request._decoded()
        request._done.set()
        if request._events is not None:
            request._events.put(None)
