"""``load`` an artifact and ``generate`` from it (a classifier artifact: ``classify``, `eec.runtime.classifier`)."""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import os
import queue
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, Mapping, Sequence

import numpy as np

from eec.calib.metrics import COSINE
from eec.calib.traces import Traces, metric_index, thresholds_for
from eec.errors import InputError, InputTypeError
from eec.runtime.core import CATCH_UPS, Batch, Decoder
from eec.runtime.engine import Engine, Event, Request
from eec.runtime.kv import FILL, PLAIN, VERIFY, WITH_HEAD, HeadCall
from eec.runtime.classifier_manifest import SCHEMA as CLASSIFIER_SCHEMA
from eec.runtime.manifest import Manifest, artifact_schema, read_manifest
from eec.runtime.options import GenerationOptions
from eec.runtime.sampling import Sampling
from eec.runtime.split import DEFAULT_TIMEOUT_S, RemoteTail, fingerprint, split_index
from eec.runtime.sessions import MAX_CALL_TOKENS, open_graphs, open_sessions, pick_device
from eec.runtime.speculative import DEFAULT_MAX_DRAFT, cycle
from eec.runtime.text import TextCodec

if TYPE_CHECKING:
    from eec.runtime.classifier import EarlyExitClassifier

MODES = ("early-exit", "full", "speculative")
DEFAULT_THRESHOLD = 0.9  # top-1 minus top-2 probability, for artifacts without calibration
DEFAULT_EPSILON = 0.9  # for calibrated artifacts
# Speculative mode's draft threshold: the code model kept 82% of drafts at 0.95 against 71% at 0.9, and
# decoded 1.22-1.26x full mode against 1.10-1.15x (docs/benchmarks.md, speculative mode on the code model).
SPECULATIVE_EPSILON = 0.95


@dataclass
class Stats:
    """Figures of one generation (a result's ``stats``)."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    exits: dict[int, int] = field(default_factory=dict)  # layer -> tokens that left there
    drafted: int = 0  # speculative mode: tokens the exit proposed
    accepted: int = 0  # of them, the ones the full model confirmed
    cycles: dict[int, int] = field(default_factory=dict)  # speculative mode: draft calls in a cycle -> cycles
    checked: int = 0  # monitored early exit: exited tokens the final head judged on catching up
    agreed: int = 0  # of them, the ones the final head would have emitted too
    fallbacks: int = 0  # split: tokens the device decided because the server did not answer
    context_full: bool = False  # it ended because the model's context had no room for another token

    @property
    def tokens_per_s(self) -> float:
        """Decode speed: tokens after the first, over the time they took."""
        return (self.new_tokens - 1) / self.decode_s if self.new_tokens > 1 and self.decode_s > 0 else 0.0

    def __str__(self) -> str:
        exits = ", ".join(f"layer {k}: {v}" for k, v in sorted(self.exits.items()))
        drafts = f"; drafts accepted: {self.accepted} of {self.drafted}" if self.drafted else ""
        checked = (f"; exited tokens the final head agrees with: {self.agreed} of {self.checked}"
                   if self.checked else "")
        fell = f"; decided on the device, the server silent: {self.fallbacks}" if self.fallbacks else ""
        return (
            f"{self.new_tokens} tokens, {self.tokens_per_s:.1f} tok/s decode, "
            f"prefill {self.prompt_tokens} tokens in {self.prefill_s * 1e3:.0f} ms; exits: {exits}{drafts}{checked}"
            f"{fell}"
        )


@dataclass
class GenerationResult:
    tokens: list[int]  # new token ids
    exits: list[int]  # layer each token left at (num_layers = the final head)
    text: str | None  # decoded new text, when the artifact has a tokenizer
    finish_reason: str | None = None  # "stop" (end of sequence or a stop string) or "length" (max_new_tokens, context)
    stats: Stats = field(default_factory=Stats)
    # A split (`eec.runtime.split`): the tokens (by index) the device's last exit decided because the
    # server did not answer.
    fallbacks: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class Split:
    """Where a device's part ends (an exit's layer) and the server that runs the rest."""

    at: int
    server: str
    timeout: float = DEFAULT_TIMEOUT_S


class EarlyExitModel:
    def __init__(self, root: Path, manifest: Manifest, threads: int | None = None, catch_up: str | None = None,
                 device: str = "auto", split: Split | None = None):
        self.root, self.manifest, self.threads = root, manifest, threads
        self.device = pick_device(device, manifest)
        self.opened: dict[str, object] = {}  # sessions by file, opened on first use (`session`)
        self.split = split
        # The segments this process runs: all of them, or a device's up to its split.
        self.local = slice(None) if split is None else slice(0, split_index(self, split.at))
        # The segments and heads now; a segment's graph with its head inside, or its verify graph, when a
        # mode first needs it: each holds a second copy of its segment's weights.
        self.graphs([PLAIN, FILL], self.local)
        for spec in manifest.segments[self.local]:
            if spec.exit and spec.exit.file:
                self.session(spec.exit.file)
        # TensorRT engines are built for calls of 1..MAX_CALL_TOKENS positions: longer ones go in pieces.
        self.max_call = MAX_CALL_TOKENS if self.device == "tensorrt" else None
        self.catch_up = self.check_catch_up(catch_up or manifest.catch_up)
        self.codec = TextCodec(root, manifest.tokenizer) if manifest.tokenizer else None
        self.stats = Stats()  # the last generation's, for convenience: each result carries its own
        self._traces: Traces | None = None
        self._thresholds: dict[tuple, dict[int, float]] = {}  # (ε, metric, rule, δ) -> τ per exit

    def session(self, file: str):
        """The onnxruntime session of one of the artifact's graphs, opened once."""
        if file not in self.opened:
            self.opened[file] = open_sessions(self.root, [file], self.threads, self.manifest, self.device)[0]
        return self.opened[file]

    def graphs(self, roles: Sequence[str], segments: slice = slice(None)) -> list[dict[str, object]]:
        """Each segment's sessions for ``roles`` (`eec.runtime.kv`), where the artifact has those graphs."""
        manifest = dataclasses.replace(self.manifest, segments=self.manifest.segments[segments])
        return open_graphs(self.root, manifest, roles, self.threads, self.device, self.opened)

    @property
    def traces(self) -> Traces:
        """The calibration traces stored in the artifact."""
        if self.manifest.calibration is None:
            raise InputError("this artifact is not calibrated; run `eec calibrate ARTIFACT` first, or pass thresholds")
        if self._traces is None:
            self._traces = Traces.load(self.root / self.manifest.calibration.file)
        return self._traces

    def thresholds_for(self, epsilon: float, metric: str | None = None, rule: str = "risk", delta: float = 0.1) -> dict[int, float]:
        """τ per exit for accuracy level ε, from the stored traces (cascade order)."""
        traces = self.traces  # refuses an uncalibrated artifact
        key = (epsilon, metric or self.manifest.calibration.metric, rule, delta)
        if key not in self._thresholds:
            self._thresholds[key] = thresholds_for(traces, *key)
        return self._thresholds[key]

    @property
    def num_layers(self) -> int:
        return self.manifest.model.num_layers

    @property
    def exits(self) -> list[int]:
        return self.manifest.exits

    def check_catch_up(self, catch_up: str) -> str:
        if catch_up not in CATCH_UPS:
            raise InputError(f"catch-up must be one of {', '.join(CATCH_UPS)}, got {catch_up!r}")
        if catch_up == "propagate" and not all(s.graph(FILL) for s in self.manifest.segments[1:]):
            raise InputError("this artifact has no key/value fill graphs for the propagating catch-up; "
                             "compile it with --catch-up propagate")
        return catch_up

    def new_batch(self, rows: int = 1, capacity: int = 256, catch_up: str | None = None, early_exit: bool = True,
                  speculative: bool = False, monitor: bool = False, segments: slice | None = None) -> Batch:
        """Decoding state for ``rows`` sequences (`eec.runtime.core`); ``capacity``: the positions each row
        expects (its KV buffers grow past it); ``catch_up``: "exact" or "propagate", by default the
        model's; ``early_exit``: it will be asked for exits, so it runs segments with their heads inside
        where the artifact has them (False for full mode, which never runs a head); ``speculative``: it
        will verify drafts, so the last segment's verify graph is opened too; ``monitor``: it checks
        exited tokens against the final head when catching up, through that graph too; ``segments``: the
        segments it runs (a split's server runs those after the split), by default this process's."""
        m = self.manifest.model
        catch_up = self.catch_up if catch_up is None else self.check_catch_up(catch_up)
        roles = [FILL] + [WITH_HEAD] * early_exit + [VERIFY] * (speculative or monitor)
        segments = self.local if segments is None else segments
        specs = self.manifest.segments[segments]
        heads = [HeadCall(self.session(s.exit.file), self.device) if s.exit and s.exit.file else None for s in specs]
        tail = None
        if self.split is not None and segments == self.local:
            tail = RemoteTail(self.split.server, self.fingerprint, self.split.timeout)
        return Batch(specs, self.graphs(roles, segments), heads, m.num_kv_heads, m.head_dim, m.context_length,
                     rows, capacity, catch_up, self.max_call, "cpu" if self.device == "cpu" else "cuda", monitor, tail)

    def new_decoder(self, capacity: int = 256, catch_up: str | None = None, early_exit: bool = True,
                    speculative: bool = False, monitor: bool = False) -> Decoder:
        """`new_batch` for one sequence, stepped with [1, n] arrays of ids."""
        return Decoder(self.new_batch(1, capacity, catch_up, early_exit, speculative, monitor))

    @functools.cached_property
    def fingerprint(self) -> str:
        """The artifact's identity on a split's wire (`eec.runtime.split.fingerprint`), read once."""
        return fingerprint(self)

    @property
    def can_monitor(self) -> bool:
        """Whether this artifact can check exited tokens live (``monitor=True``): it has the last segment's
        verify graph and runs the exact catch-up."""
        return self.split is None and self.catch_up == "exact" and any(s.graph(VERIFY) for s in self.manifest.segments)

    def encode(self, prompt: str | Sequence[int], chat: bool | None = None) -> list[int]:
        """Token ids of a prompt given as text (in the chat template where the model has one, unless
        ``chat=False``) or as token ids; anything else, or ids this model cannot take, is refused."""
        if isinstance(prompt, str):
            if self.codec is None:
                raise InputError("this artifact has no tokenizer; pass the prompt as a list of token ids")
            ids = self.codec.encode(self.codec.check(prompt), chat=chat if chat is not None else True)
        else:
            ids = token_ids(prompt)
        return self._checked(ids)

    def encode_chat(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        """Token ids of a conversation (``[{"role": ..., "content": ...}, ...]``) in the model's chat
        template, ready for the assistant's turn."""
        if self.codec is None or not self.codec.spec.chat_template:
            raise InputError("this model has no chat template; send a plain prompt instead")
        if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
            raise InputError("messages must be a non-empty list of {role, content} objects")
        for m in messages:
            if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise InputError("each message must have a role and a content, both text")
            self.codec.check(m["content"])
        text = self.codec.render_chat([{"role": m["role"], "content": m["content"]} for m in messages])
        return self._checked(self.codec.tokenizer.encode(text, add_special_tokens=False).ids)

    def _checked(self, ids: list[int]) -> list[int]:
        if not ids:
            raise InputError("the prompt is empty")
        vocab = self.manifest.model.vocab_size
        if min(ids) < 0 or max(ids) >= vocab:
            raise InputError(f"prompt token ids must be in 0..{vocab - 1}")
        context = self.manifest.model.context_length
        if len(ids) >= context:
            raise InputError(f"the prompt is {len(ids)} tokens; this model's context is {context} tokens")
        return ids

    def metric_id(self, metric: str | None) -> int:
        """The index in `ALL_METRICS` of ``metric``, by default the calibration's (else the top-2 margin)."""
        if metric is None:
            metric = self.manifest.calibration.metric if self.manifest.calibration else "top2-margin"
        if not isinstance(metric, str):
            raise InputError(f"metric must be a metric's name, got {metric!r}")
        return metric_index(metric)

    def resolve_thresholds(self, mode: str, thresholds=None, epsilon: float | None = None, metric: str | None = None,
                           rule: str = "risk", delta: float = 0.1) -> tuple[dict[int, float] | None, int]:
        """Per-exit thresholds and the metric they apply to.

        ``thresholds``: a number, a list (one per exit) or a {layer: value}
        map; or ``epsilon``, for calibrated artifacts. With neither, a
        calibrated artifact uses ε = 0.9, an uncalibrated one 0.9 on the top-2 margin.
        """
        if mode not in MODES:
            raise InputError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if thresholds is not None and epsilon is not None:
            raise InputError("give thresholds or epsilon, not both")
        calibrated = self.manifest.calibration is not None
        metric = metric or (self.manifest.calibration.metric if calibrated else "top2-margin")
        index = self.metric_id(metric)
        if mode == "full" or not self.exits:
            return None, index  # an artifact without exits (placement chose none) always runs in full
        if thresholds is None and (epsilon is not None or calibrated):
            return self.thresholds_for(DEFAULT_EPSILON if epsilon is None else epsilon, metric, rule, delta), index
        exits = self.exits
        if thresholds is None:
            thresholds = DEFAULT_THRESHOLD
        if isinstance(thresholds, (str, bytes, bool)) or not isinstance(thresholds, (numbers.Real, Mapping, Iterable)):
            raise InputTypeError(f"thresholds must be a number, a list of numbers (one per exit) or a {{layer: number}} "
                             f"map, got {type(thresholds).__name__}")
        if isinstance(thresholds, numbers.Real):
            values = {e: _number(thresholds) for e in exits}
        elif isinstance(thresholds, Mapping):
            unknown = sorted(set(_layer(k) for k in thresholds) - set(exits))
            if unknown:
                raise InputError(f"no exit at layers {unknown}; this artifact's exits are {exits}")
            values = {_layer(k): _number(v) for k, v in thresholds.items()}
        else:
            thresholds = list(thresholds)
            if len(thresholds) != len(exits):
                raise InputError(f"{len(thresholds)} thresholds for {len(exits)} exits ({exits})")
            values = {e: _number(t) for e, t in zip(exits, thresholds)}
        if any(math.isnan(v) for v in values.values()):
            raise InputError("thresholds must be numbers, not NaN")
        return values, index

    def generate(
        self,
        prompt: str | Sequence[int] | Sequence[str | Sequence[int]],
        options: GenerationOptions | None = None,
        *,
        stream: bool = False,
        metric: str | None = None,
        catch_up: str | None = None,
        monitor: bool = False,
        max_batch: int = 8,
        max_draft: int | None = None,
        draft_layer: int | None = None,
        **changes,
    ):
        """Generation, of one prompt or of a list of them decoded together.

        What each request asks is ``options`` (`eec.runtime.options.GenerationOptions`, its defaults
        when None) with ``changes``, its fields by name: ``generate(prompt, max_new_tokens=32)``. The
        other arguments say how the whole generation runs; ``metric`` is the confidence metric every
        request's thresholds apply to (default: the calibration's).

        ``prompt`` is a string (wrapped in the chat template when the model has
        one, unless ``chat=False``) or token ids; or a list of such prompts,
        decoded together in batches of up to ``max_batch`` rows, each leaving at
        its own exit (`eec.runtime.engine`), which returns a list of results in
        the prompts' order. ``mode="full"`` runs every
        layer; ``"early-exit"`` leaves at the first exit whose confidence
        reaches its threshold: given as ``thresholds``, or computed from the
        artifact's calibration for accuracy level ``epsilon`` (the share of
        exited tokens that agree with the full model), with ``rule`` "risk"
        (holds with probability 1 - ``delta``) or "valade" (the paper's rule).
        Generation ends at the end-of-sequence token (unless ``ignore_eos``, for
        benchmarks), at a ``stop`` string (the text ends before it), after
        ``max_new_tokens`` or at the model's context; the result's
        ``finish_reason`` says which ("stop" or "length") and its ``stats`` how it went.
        Tokens are the heads' most likely ones unless ``temperature``, ``top_k``,
        ``top_p`` or ``seed`` is given: then each is drawn from the deciding head's
        64 most likely tokens (`eec.runtime.sampling`, where ε's meaning with
        sampling is said); a ``seed`` repeats a generation exactly.

        Returns a `GenerationResult`, or with ``stream=True`` an iterator of text
        pieces (token ids when the artifact has no tokenizer); for a list of
        prompts, a list of results, or with ``stream=True`` an iterator of
        `eec.runtime.engine.Event` (which prompt, token, exit, text piece).
        ``catch_up`` ("exact" or "propagate") overrides how deeper layers get the
        KV of exited tokens (`eec.runtime.core`; by default the artifact's).
        ``self.stats`` is the last finished generation's, for convenience.

        ``mode="speculative"`` gives ``full`` mode's tokens faster where the exit
        is often right (`eec.runtime.speculative`): the exit at ``draft_layer``
        (default: the first) drafts up to ``max_draft`` (default 6) tokens while its
        confidence reaches the threshold for ``epsilon`` (default 0.95; or ``thresholds``), and
        the deeper layers check them in one call. It needs the verify graph that
        `eec compile --speculative` writes, and runs one sequence at a time (a
        list of prompts goes one after another).

        ``monitor=True`` (early-exit mode, same graph, exact catch-up) checks
        exited tokens as their positions catch up to the last segment: the
        final head runs over those positions too (one call either way), and
        ``stats.agreed`` of ``stats.checked`` exited tokens equal what the full
        model would have emitted after the same prefix: the agreement ε
        promises, measured live on this traffic (tokens after the last deep one
        stay unchecked; in a batch, an exited token whose position rides the
        deeper rows' call to the last segment is checked on the spot).
        """
        options = GenerationOptions.of(options, changes)
        mode = options.mode
        if mode not in MODES:
            raise InputError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if monitor:
            self._check_monitor(mode, catch_up)
            if Sampling.make(options.temperature, options.top_k, options.top_p, options.seed) is not None:
                raise InputError("monitor checks greedy exits against the final head's token: it does not sample")
        if is_prompt_list(prompt):
            prompts = list(prompt)
            if not prompts:
                raise InputError("no prompts: the list is empty")
            if mode == "speculative":
                if stream:
                    raise InputError("speculative decoding runs one sequence at a time: stream one prompt at a time")
                return [self.generate(p, options, metric=metric, catch_up=catch_up, max_draft=max_draft,
                                      draft_layer=draft_layer) for p in prompts]
            engine = Engine(self, max_batch=min(max_batch, len(prompts)), metric=metric, catch_up=catch_up,
                            monitor=monitor, capacity=self._capacity(options.max_new_tokens), early_exit=mode != "full")
            requests = [engine.submit(p, options, index=i) for i, p in enumerate(prompts)]  # all checked first
            if stream:
                for r in requests:  # text piece by piece, in the events `engine.step` returns (no queue)
                    r.stream = True
                return self._events(engine)
            engine.run()
            results = [r.result() for r in requests]
            self.stats = results[-1].stats
            return results
        if mode == "speculative":
            request = self.make_request(prompt, options, metric=metric)
            steps = self._speculative(request, catch_up, max_draft, draft_layer)
        else:
            engine = Engine(self, max_batch=1, metric=metric, catch_up=catch_up, monitor=monitor,
                            capacity=self._capacity(options.max_new_tokens), early_exit=mode != "full")
            request = engine.submit(prompt, options)
            request.stream = stream  # its pieces are read from `request.piece` as it goes, not from a queue
            steps = self._one(engine, request)
        if stream:
            return self._stream(request, steps)
        for _ in steps:
            pass
        return request.as_result()

    def make_request(self, prompt, options: GenerationOptions | None = None, *, index: int = 0,
                     metric: str | None = None, stream: bool = False, sink=None) -> Request:
        """A checked `eec.runtime.engine.Request`: prompt encoded, thresholds resolved, ``options`` checked
        against this artifact (``metric``: the one its thresholds apply to, by default the calibration's).
        ``sink``: an object whose ``put`` takes each `Event` as it comes, then None (a streamed request's
        queue by default); a server's event loop hands it on without a thread waiting on a queue."""
        o = GenerationOptions.of(options, {})
        if self.manifest.part is not None and self.manifest.part.role == "server":
            raise InputError("this is the server part of a split: it runs behind `eec serve` for a device, which "
                             "loads the device part")
        limit = o.max_new_tokens
        if not isinstance(limit, (int, np.integer)) or isinstance(limit, bool) or limit < 1:
            raise InputError(f"max_new_tokens must be a whole number of at least 1, got {limit!r}")
        epsilon = o.epsilon
        if o.mode == "speculative" and o.thresholds is None and epsilon is None and self.manifest.calibration:
            epsilon = SPECULATIVE_EPSILON
        values, metric_id = self.resolve_thresholds(o.mode, o.thresholds, epsilon, metric, o.rule, o.delta)
        sampling = Sampling.make(o.temperature, o.top_k, o.top_p, o.seed)
        if sampling is not None:
            self._check_sampling(o.mode)
        stops = stop_strings(o.stop)
        if stops and self.codec is None:
            raise InputError("stop strings need the artifact's tokenizer; this artifact has none")
        ids = self.encode(prompt, o.chat)
        request = Request(index=index, ids=ids, max_new_tokens=int(limit), thresholds=values, metric=metric_id,
                          eos=frozenset() if o.ignore_eos else frozenset(self.manifest.eos_token_ids), stop=stops,
                          stream=stream, sampling=sampling, rng=sampling.generator() if sampling else None)
        if self.codec is not None:
            request._decoder = self.codec.piece_decoder()
        if sink is not None:
            request._events = sink
        elif stream:
            request._events = queue.SimpleQueue()
        return request

    def _capacity(self, max_new_tokens) -> int:
        """Positions a row's KV buffers start with: a prompt of a few dozen tokens and its new ones."""
        return 64 + max_new_tokens if isinstance(max_new_tokens, int) and max_new_tokens > 0 else 256

    def _one(self, engine: Engine, request: Request) -> Iterator[tuple[int, int]]:
        """One request through a one-row engine, token by token (`generate` of one prompt)."""
        while engine.busy:
            for _, event in engine.step():
                yield event.token, event.exit_layer
        self.stats = request.stats

    def _stream(self, request: Request, steps: Iterator[tuple[int, int]]) -> Iterator[str | int]:
        """One prompt's text pieces as its tokens come (the request's, so stop strings and a split
        character at the end come out as in its result's text); token ids without a tokenizer."""
        for token, _ in steps:
            if self.codec is None:
                yield token
            elif request.piece:
                yield request.piece

    def _events(self, engine: Engine) -> Iterator[Event]:
        finished = []
        while engine.busy:
            for request, event in engine.step():
                if event.finish_reason is not None:
                    finished.append(request)
                yield event
        if finished:
            self.stats = finished[-1].stats

    def _require_verify(self, purpose: str, catch_up: str | None) -> None:
        """Speculative mode and the monitor run the last segment's verify graph through the exact catch-up."""
        if self.split is not None:
            raise InputError("a split model runs early exit and full mode; the verify graph is the server's")
        if not any(s.graph(VERIFY) for s in self.manifest.segments):
            raise InputError(f"this artifact has no verify graph {purpose}; compile it with --speculative on")
        if (catch_up or self.catch_up) != "exact":
            raise InputError(f"the verify graph {purpose} runs through the exact catch-up: pass catch_up='exact'")

    def _check_sampling(self, mode: str) -> None:
        if mode == "speculative":
            raise InputError("speculative decoding gives full mode's greedy tokens: it does not sample")
        final = self.session(self.manifest.segments[-1].file)
        if "top_ids" not in {o.name for o in final.get_outputs()}:
            raise InputError("this artifact's heads return no top tokens to sample from (compiled by an older eec); "
                             "recompile it to sample")

    def _check_monitor(self, mode: str, catch_up: str | None) -> None:
        if mode != "early-exit":
            raise InputError("monitor checks exited tokens: it needs mode='early-exit'")
        self._require_verify("to check exits with", catch_up)

    def _draft_exit(self, draft_layer: int | None, max_draft: int, metric: int, catch_up: str | None) -> int:
        """The index, among the exits, of the one speculative mode drafts at; refuses what it cannot run."""
        if not self.exits:
            raise InputError("speculative decoding drafts at an exit: this artifact has none")
        if draft_layer is not None and draft_layer not in self.exits:
            raise InputError(f"no exit at layer {draft_layer} to draft at; this artifact's exits are {self.exits}")
        if max_draft < 1:
            raise InputError("max_draft must be at least 1")
        if metric == COSINE:
            raise InputError("speculative decoding drafts on a head score or the exit classifier, not on cosine")
        self._require_verify("for speculative decoding", catch_up)
        return self.exits.index(self.exits[0] if draft_layer is None else draft_layer)

    def _speculative(self, request: Request, catch_up: str | None, max_draft: int | None,
                     draft_layer: int | None) -> Iterator[tuple[int, int]]:
        """The prompt through every layer, then draft-and-verify cycles (`eec.runtime.speculative`).
        Every token is the full model's: its layer is reported as the last."""
        max_draft = DEFAULT_MAX_DRAFT if max_draft is None else max_draft
        draft = self._draft_exit(draft_layer, max_draft, request.metric, catch_up)
        if request.thresholds is None or self.exits[draft] not in request.thresholds:
            raise InputError(f"no threshold for the draft exit at layer {self.exits[draft]}")
        threshold = request.thresholds[self.exits[draft]]
        ids, context = request.ids, self.manifest.model.context_length
        decoder = self.new_decoder(len(ids) + request.max_new_tokens + max_draft, catch_up, speculative=True)
        stats = request.stats = Stats(prompt_tokens=len(ids))
        start = time.perf_counter()
        produced = [decoder.step(np.asarray([ids], dtype=np.int64), None).token]
        stats.prefill_s = time.perf_counter() - start
        elapsed = 0.0
        while True:
            for t in produced:
                room = len(ids) + len(request.tokens) + 1 < context
                request.accept(t, self.num_layers, elapsed, room)
                elapsed = 0.0
                yield t, self.num_layers
                if request.finish_reason:
                    self.stats = stats
                    return
            start = time.perf_counter()
            context_left = context - decoder.states[0].length - 1
            room = min(max_draft, request.max_new_tokens - len(request.tokens), context_left)
            step = cycle(decoder, produced[-1], draft, threshold, request.metric, max(room, 1))
            elapsed = time.perf_counter() - start
            stats.drafted += step.drafted
            stats.accepted += step.accepted
            stats.cycles[step.calls] = stats.cycles.get(step.calls, 0) + 1
            produced = step.tokens


def _number(value) -> float:
    """A threshold: a real number (±inf allowed), never text or a truth value read as one."""
    if isinstance(value, (str, bytes, bool)) or not isinstance(value, numbers.Real):
        raise InputTypeError(f"thresholds must be numbers, got {value!r}")
    return float(value)


def _layer(key) -> int:
    if isinstance(key, bool) or not isinstance(key, (int, str)) or not str(key).strip().isdigit():
        raise InputTypeError(f"threshold keys must be exit layers, got {key!r}")
    return int(key)


def token_ids(prompt) -> list[int]:
    """A prompt given as token ids, checked: whole numbers only (no floats truncated, no bytes read as ids)."""
    if isinstance(prompt, (bytes, bytearray, memoryview)):
        raise InputTypeError("a prompt is text (str) or a list of token ids, not bytes; decode the bytes first")
    if isinstance(prompt, np.ndarray):
        if prompt.ndim != 1 or not np.issubdtype(prompt.dtype, np.integer):
            raise InputTypeError(f"token ids must be a 1-D array of integers, got {prompt.dtype} of shape {prompt.shape}")
        return [int(t) for t in prompt]
    if not isinstance(prompt, (list, tuple)):
        raise InputTypeError(f"a prompt is text (str) or a list of token ids, not {type(prompt).__name__}")
    bad = next((t for t in prompt if isinstance(t, bool) or not isinstance(t, (int, np.integer))), None)
    if bad is not None:
        raise InputTypeError(f"token ids must be whole numbers, got {bad!r} ({type(bad).__name__})")
    return [int(t) for t in prompt]


def is_prompt_list(prompt) -> bool:
    """Whether ``generate`` was given several prompts (a list of texts or of id lists), not one."""
    if isinstance(prompt, (list, tuple)):
        return len(prompt) == 0 or isinstance(prompt[0], (str, list, tuple, np.ndarray))
    return False


def stop_strings(stop) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = (stop,) if isinstance(stop, str) else tuple(stop) if isinstance(stop, (list, tuple)) else None
    if stops is None or not all(isinstance(s, str) and s for s in stops):
        raise InputError(f"stop must be a non-empty string or a list of them, got {stop!r}")
    return stops


def load(path: str | os.PathLike, *, threads: int | None = None, verify: bool = True,
         catch_up: str | None = None, device: str = "auto", split: int | None = None, server: str | None = None,
         timeout: float = DEFAULT_TIMEOUT_S) -> "EarlyExitModel | EarlyExitClassifier":
    """Open an artifact directory: a decoder's (`EarlyExitModel`, ``generate``) or a classifier's
    (`eec.runtime.classifier.EarlyExitClassifier`, ``classify``). ``verify`` checks every file's sha256 first; ``catch_up``
    ("exact" or "propagate") replaces the artifact's default for every generation; ``device``:
    "cpu", "cuda" or "tensorrt", or "auto" (`eec.runtime.sessions.pick_device`). ``split``, ``server``:
    run the segments up to the exit at layer ``split`` (a classifier's: after stage ``split``) here and
    the rest on the eec server at URL ``server`` (`eec serve ARTIFACT --split N`), waiting at most
    ``timeout`` seconds for it before the device's own exit decides (`eec.runtime.split`)."""
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise InputError(f"threads must be a whole number of at least 1, got {threads!r}")
    root = Path(path)
    if artifact_schema(root) == CLASSIFIER_SCHEMA:  # a branched classifier: `classify` in place of `generate`
        if catch_up is not None:
            raise InputError("catch_up applies to decoder artifacts; this one is a classifier")
        from eec.runtime.classifier import load_classifier

        return load_classifier(root, threads=threads, verify=verify, device=device, split=split, server=server,
                               timeout=timeout)
    manifest = read_manifest(root, verify=verify)
    if manifest.part is not None and manifest.part.role == "device":
        if server is None:
            raise InputError("this is the device part of a split: pass the server's URL (server=, --server)")
        if split not in (None, manifest.part.at):
            raise InputError(f"this device part ends at layer {manifest.part.at}, not {split}")
        split = manifest.part.at
    if (split is None) != (server is None):
        raise InputError("a split needs both the layer (split) and the server's URL (server)")
    if split is not None and catch_up not in (None, "exact"):
        raise InputError("a split decodes with the exact catch-up")
    parts = None if split is None else Split(split, server, timeout)
    return EarlyExitModel(root, manifest, threads, "exact" if parts else catch_up, device, parts)
