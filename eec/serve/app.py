"""The HTTP application: one artifact behind OpenAI's completions and chat completions, or ``/v1/classify``.

A decoder artifact runs in one `eec.runtime.engine.Engine` (continuous
batching, per-row exits) in a worker thread of its own; the event loop only
parses requests, submits them and writes what the engine produces. Each
request's events reach the loop through ``call_soon_threadsafe``: no thread
waits on a queue per client, so 256 open streams cost 256 asyncio queues, not
256 threads. A stream whose client goes away cancels its request: its row and
KV are freed before the engine's next step.

Overload is refused, not queued without bound: past ``max_queue`` waiting
requests the answer is 429 with ``Retry-After``; a closing or failed engine
answers 503. Bad requests are 400 with OpenAI's error object.

Sampling follows OpenAI's defaults (temperature 1, top_p 1): send
``temperature: 0`` for the greedy tokens `generate` gives by default. eec's own
request fields: ``epsilon`` (accuracy level), ``mode`` ("early-exit" or
"full"), ``top_k``; each choice answers with ``token_ids`` and ``exits`` (the
layer each token left at), and streamed chunks carry the same per token.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, AsyncIterator

import numpy as np
from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from eec.errors import ArtifactError, EecError, InputError, Overloaded
from eec.runtime.options import GenerationOptions
from eec.serve.metrics import Metrics
from eec.serve.schemas import Chat, Classify, Completion, Generation

RETRY_AFTER_S = 1  # what a refused client is told to wait; a step of a batch takes milliseconds


class HTTPError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", retry: bool = False):
        super().__init__(message)
        self.status, self.message, self.kind, self.retry = status, message, kind, retry

    def response(self) -> JSONResponse:
        headers = {"Retry-After": str(RETRY_AFTER_S)} if self.retry else None
        return JSONResponse({"error": {"message": self.message, "type": self.kind, "param": None, "code": None}},
                            status_code=self.status, headers=headers)


def http_error(e: BaseException) -> HTTPError:
    """The HTTP answer to an error: the caller's (400), overload (429), the server's state (503), or ours (500)."""
    if isinstance(e, HTTPError):
        return e
    if isinstance(e, InputError):
        return HTTPError(400, str(e))
    if isinstance(e, Overloaded):
        return HTTPError(429, str(e), "overloaded", retry=True)
    if isinstance(e, ArtifactError):
        return HTTPError(500, str(e), "server_error")
    if isinstance(e, EecError):
        return HTTPError(503, str(e), "unavailable", retry=True)
    return HTTPError(500, f"{type(e).__name__}: {str(e)[:300]}", "server_error")


class _Sink:
    """Hands one request's events from the engine's thread to the event loop, tagged with its choice."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, tag: int):
        self.loop, self.queue, self.tag = loop, queue, tag

    def put(self, item) -> None:
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is left to read it
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (self.tag, item))


class Decoding:
    """A decoder artifact behind the completions endpoints."""

    kind = "decoder"

    def __init__(self, model, name: str, *, max_batch: int, max_queue: int, epsilon: float | None,
                 monitor: bool | None):
        from eec.runtime.engine import Engine

        self.model, self.name, self.epsilon = model, name, epsilon
        self.monitor = model.can_monitor if monitor is None else monitor
        self.engine = Engine(model, max_batch=max_batch, max_waiting=max_queue, monitor=self.monitor)
        self.metrics = Metrics(self.kind)
        self.metrics.queue_depth.set_function(lambda: self.engine.waiting)
        self.metrics.running.set_function(lambda: self.engine.live)
        self.inflight: set = set()
        self.context = model.manifest.model.context_length

    def start(self) -> None:
        self.engine.start()

    def stop(self) -> None:
        for request in list(self.inflight):
            request.cancel()
        self.engine.close()

    def healthy(self) -> bool:
        return self.engine._worker is not None and self.engine._worker.is_alive()

    def options(self, body: Generation, ids: list[int]) -> GenerationOptions:
        reason = body.unsupported()
        if reason:
            raise InputError(reason)
        limit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        if limit is None:  # as OpenAI's chat API: up to the context
            limit = max(1, self.context - len(ids) - 1)
        epsilon = body.epsilon if body.epsilon is not None else self.epsilon
        return GenerationOptions(max_new_tokens=limit, mode=body.mode,
                                 epsilon=epsilon if body.mode == "early-exit" else None, stop=body.stop,
                                 temperature=1.0 if body.temperature is None else body.temperature,
                                 top_p=body.top_p, top_k=body.top_k, seed=body.seed)

    def submit(self, prompts: list[list[int]], body: Generation) -> tuple[list, asyncio.Queue]:
        """Queue every prompt (all checked before any is queued: a bad one is a 400 for the whole request)."""
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        made = [self.options(body, ids) for ids in prompts]
        requests = []
        try:
            for i, (ids, options) in enumerate(zip(prompts, made)):
                requests.append(self.engine.submit(ids, options, sink=_Sink(loop, queue, i)))
        except BaseException:
            for r in requests:
                r.cancel()
            raise
        self.inflight.update(requests)
        for r in requests:
            self.metrics.prompt_tokens.inc(len(r.ids))
        return requests, queue

    async def events(self, requests: list, queue: asyncio.Queue, started: float) -> AsyncIterator[tuple[int, Any]]:
        """(choice, event) as they come; (choice, None) when a choice ends. Cancels what is left if the
        reader stops early (a client gone)."""
        left, first = len(requests), True
        m = self.metrics
        try:
            while left:
                i, event = await queue.get()
                if event is None:
                    left -= 1
                    request = requests[i]
                    self.inflight.discard(request)
                    if request.error is not None:
                        raise request.error
                    if self.monitor and request.stats is not None:
                        m.monitored(request.stats.checked, request.stats.agreed)
                elif first:
                    m.first_token.observe(time.perf_counter() - started)
                    first = False
                if event is not None:
                    m.tokens.inc()
                    m.throughput.add()
                    m.exits.labels(str(event.exit_layer)).inc()
                yield i, event
        finally:
            for r in requests:
                if not r.done:
                    r.cancel()
                self.inflight.discard(r)


class Classifying:
    """A classifier artifact behind ``/v1/classify``. One worker thread runs the classifier (onnxruntime's
    thread pool does the parallel work); at most ``max_queue`` requests wait for it. With ``max_samples``
    above 1, the next call takes every waiting request with the same options together, up to that many
    samples (an idle server adds no delay to a lone request). Off by default: on 2 CPU cores it lost
    (docs/benchmarks.md: the stdlib BERT pads a merged call to its longest text, 0.74x; the digits CNN
    is so fast that the HTTP work per request leaves little to merge, 0.96x); it is for models whose
    calls gain from batches, as on a GPU."""

    kind = "classifier"

    def __init__(self, classifier, name: str, *, max_queue: int, epsilon: float | None, max_samples: int = 1):
        self.classifier, self.name, self.epsilon, self.max_queue = classifier, name, epsilon, max_queue
        self.max_samples = max_samples
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="eec-classify")
        self.waiting: list[tuple[tuple, object, asyncio.Future]] = []  # (options, inputs, answer)
        self.busy = False
        self.metrics = Metrics(self.kind)
        self.metrics.queue_depth.set_function(lambda: len(self.waiting))
        self.metrics.running.set_function(lambda: int(self.busy))

    def start(self) -> None:
        pass

    def stop(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)

    def healthy(self) -> bool:
        return True

    def inputs(self, body: Classify):
        if self.classifier.text is not None:
            if isinstance(body.input, list) and not all(isinstance(t, str) for t in body.input):
                raise InputError("input must be a text or a list of texts")
            return [body.input] if isinstance(body.input, str) else body.input
        try:
            x = np.asarray(body.input, dtype=self.classifier.manifest.input_dtype)
        except (ValueError, TypeError):
            raise InputError("input must be an array of numbers (samples of the same shape)") from None
        if list(x.shape) == self.classifier.manifest.input_shape:
            x = x[None]  # one sample
        return self.classifier.check_input(x)

    async def classify(self, body: Classify) -> dict:
        x = self.inputs(body)
        if len(self.waiting) >= self.max_queue:
            raise Overloaded(f"{len(self.waiting)} requests are waiting already; try again later")
        epsilon = body.epsilon if body.epsilon is not None else self.epsilon
        early = body.mode == "early-exit"
        options = (body.mode, epsilon if early else None, body.metric, body.criterion if early else None)
        answer = asyncio.get_running_loop().create_future()
        self.waiting.append((options, x, answer))
        if not self.busy:
            asyncio.get_running_loop().create_task(self._drain())
        result, merged = await answer
        names = result.class_names
        data = []
        for i, (label, exit_, probs) in enumerate(zip(result.labels.tolist(), result.exits.tolist(), result.probs)):
            item = {"index": i, "label": label, "label_name": names[label] if names else None, "exit": exit_,
                    "probability": float(probs[label])}
            if result.truncated is not None:
                item["truncated"] = bool(result.truncated[i])
            if body.return_probs:
                item["probs"] = probs.tolist()
            data.append(item)
        m = self.metrics
        m.samples.inc(len(data))
        m.throughput.add(len(data))
        for stage, count in zip(*np.unique(result.exits, return_counts=True)):
            m.exits.labels(str(int(stage))).inc(int(count))
        return {"object": "list", "model": self.name, "data": data,
                "usage": {"samples": len(data), "seconds": result.stats.seconds, "batch": merged}}

    async def _drain(self) -> None:
        """Run the waiting requests, those with the first one's options together, until none waits."""
        self.busy = True
        try:
            while self.waiting:
                options = self.waiting[0][0]
                taken, rest, samples = [], [], 0
                for item in self.waiting:
                    if item[0] == options and (not taken or samples + len(item[1]) <= self.max_samples):
                        taken.append(item)
                        samples += len(item[1])
                    else:
                        rest.append(item)
                self.waiting = rest
                await self._run(options, taken)
        finally:
            self.busy = False

    async def _run(self, options: tuple, taken: list) -> None:
        mode, epsilon, metric, criterion = options
        xs = [x for _, x, _ in taken]
        merged = sum(len(x) for x in xs)
        together = [t for x in xs for t in x] if self.classifier.text is not None else np.concatenate(xs)
        run = lambda inputs: self.classifier.classify(inputs, epsilon=epsilon, metric=metric, mode=mode,  # noqa: E731
                                                      criterion=criterion)
        loop = asyncio.get_running_loop()
        try:
            result = await loop.run_in_executor(self.pool, run, together)
        except Exception as e:  # noqa: BLE001 - whose input was it? each request alone says
            if len(taken) == 1:
                taken[0][2].set_exception(e)
                return
            for item in taken:
                await self._run(options, [item])
            return
        at = 0
        for _, x, answer in taken:
            part = slice(at, at + len(x))
            at += len(x)
            if not answer.done():
                answer.set_result((dataclasses.replace(
                    result, labels=result.labels[part], probs=result.probs[part], exits=result.exits[part],
                    truncated=None if result.truncated is None else result.truncated[part]), merged))


def create_app(artifact, *, name: str | None = None, max_batch: int = 8, max_queue: int = 256,
               threads: int | None = None, epsilon: float | None = None, monitor: bool | None = None,
               split: int | None = None, sessions: int = 64, max_samples: int = 1) -> FastAPI:
    """The ASGI application serving ``artifact`` (a path, or a model `eec.runtime.load` returned).

    ``max_batch``: rows decoded together; ``max_queue``: requests that may
    wait beyond them before new ones get 429; ``epsilon``: the accuracy
    level of requests that give none (default: the artifact's calibration
    default); ``monitor``: check exited tokens against the final head live
    (``/metrics``' agreement; default: where the artifact has the graph it needs); ``split``: also serve
    ``/v1/tail``, the layers after the exit at that layer for devices that run the rest
    (`eec.runtime.split`), keeping the KV of up to ``sessions`` devices' sequences; ``max_samples``:
    a classifier's waiting requests classified in one call hold up to this many samples (1, the default:
    one request a call).
    """
    from eec.runtime import load

    if isinstance(artifact, (str, os.PathLike)):
        name = name or Path(artifact).name
        artifact = load(artifact, threads=threads)
    name = name or "eec"
    part = getattr(getattr(artifact, "manifest", None), "part", None)
    if part is not None and part.role == "server":  # only the layers after the split: /v1/tail alone
        return _server_part_app(artifact, name, split if split is not None else part.at, sessions, max_queue)
    if hasattr(artifact, "generate"):
        service: Decoding | Classifying = Decoding(artifact, name, max_batch=max_batch, max_queue=max_queue,
                                                   epsilon=epsilon, monitor=monitor)
    else:
        if not isinstance(max_samples, int) or isinstance(max_samples, bool) or max_samples < 1:
            raise InputError(f"max_samples must be a whole number of at least 1, got {max_samples!r}")
        service = Classifying(artifact, name, max_queue=max_queue, epsilon=epsilon, max_samples=max_samples)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        service.start()
        try:
            yield
        finally:
            service.stop()

    app = FastAPI(title="eec", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.service = service
    metrics = service.metrics

    def answer(endpoint: str, status: int, started: float) -> None:
        metrics.requests.labels(endpoint, str(status)).inc()
        metrics.latency.labels(endpoint).observe(time.perf_counter() - started)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: HTTPRequest, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or "body"
        metrics.requests.labels(request.url.path, "400").inc()
        return HTTPError(400, f"{where}: {first.get('msg', 'invalid request')}").response()

    @app.get("/health")
    async def health():
        ok = service.healthy()
        body = {"status": "ok" if ok else "unavailable", "model": name, "kind": service.kind,
                "pid": os.getpid()}  # which replica answered, behind a router
        if isinstance(service, Decoding):
            body.update(running=service.engine.live, waiting=service.engine.waiting)
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "eec"}]}

    def refuse(endpoint: str, e: BaseException, started: float) -> JSONResponse:
        return _refused(metrics, endpoint, e, started)

    if isinstance(service, Classifying):
        @app.post("/v1/classify")
        async def classify(body: Classify):
            started = time.perf_counter()
            try:
                out = await service.classify(body)
            except Exception as e:  # noqa: BLE001 - every failure is an HTTP answer
                return refuse("/v1/classify", e, started)
            answer("/v1/classify", 200, started)
            return out

        for path in ("/v1/completions", "/v1/chat/completions"):
            app.post(path)(_wrong_kind("this server runs a classifier: POST /v1/classify"))
        if split is not None:
            _classifier_tail_route(app, service, split)
        return app

    app.post("/v1/classify")(_wrong_kind("this server runs a text generator: POST /v1/completions"))
    if split is not None:
        _tail_route(app, service, split, sessions, max_queue)

    @app.post("/v1/completions")
    async def completions(body: Completion):
        started = time.perf_counter()
        try:
            prompts = [service.model.encode(p, chat=False) for p in body.prompts()]
            requests, queue = service.submit(prompts, body)
        except Exception as e:  # noqa: BLE001
            return refuse("/v1/completions", e, started)
        return await _respond(service, "/v1/completions", "text_completion", body, requests, queue, started, answer)

    @app.post("/v1/chat/completions")
    async def chat(body: Chat):
        started = time.perf_counter()
        try:
            reason = body.unsupported()
            if reason:
                raise InputError(reason)
            ids = service.model.encode_chat([{"role": m.role, "content": m.text()} for m in body.messages])
            requests, queue = service.submit([ids], body)
        except Exception as e:  # noqa: BLE001
            return refuse("/v1/chat/completions", e, started)
        return await _respond(service, "/v1/chat/completions", "chat.completion", body, requests, queue, started,
                              answer)

    return app


def _wrong_kind(message: str):
    async def handler():
        return HTTPError(404, message, "not_found").response()
    return handler


async def _respond(service: Decoding, endpoint: str, obj: str, body: Generation, requests: list, queue,
                   started: float, answer):
    rid = ("chatcmpl-" if obj == "chat.completion" else "cmpl-") + uuid.uuid4().hex[:24]
    created = int(time.time())
    head = {"id": rid, "created": created, "model": service.name}
    chat = obj == "chat.completion"
    usage = lambda: {"prompt_tokens": sum(len(r.ids) for r in requests),  # noqa: E731
                     "completion_tokens": sum(len(r.tokens) for r in requests),
                     "total_tokens": sum(len(r.ids) + len(r.tokens) for r in requests)}
    if not body.stream:
        try:
            async for _ in service.events(requests, queue, started):
                pass
        except Exception as e:  # noqa: BLE001 - the engine failed under this request
            return _refused(service.metrics, endpoint, e, started)
        choices = []
        for i, r in enumerate(requests):
            text = r.text if r._decoder is not None else ""
            choice = {"index": i, "finish_reason": r.finish_reason, "logprobs": None, "token_ids": list(r.tokens),
                      "exits": list(r.exits)}
            if chat:
                choice["message"] = {"role": "assistant", "content": text}
            else:
                choice["text"] = text
            choices.append(choice)
        answer(endpoint, 200, started)
        return {**head, "object": obj, "choices": choices, "usage": usage()}

    chunk_obj = "chat.completion.chunk" if chat else "text_completion"
    include_usage = body.stream_options is not None and body.stream_options.include_usage

    def sse(payload: dict) -> str:
        return f"data: {json.dumps({**head, 'object': chunk_obj, **payload}, ensure_ascii=False)}\n\n"

    async def stream():
        status = 499  # unless it ends: the client went away, and closing `events` cancelled its requests
        try:
            if chat:
                yield sse({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                        "finish_reason": None, "logprobs": None}]})
            # aclosing: a stream closed while it waits on the client closes `events` at once (not when
            # garbage-collected), so the request leaves the batch before the next step
            async with contextlib.aclosing(service.events(requests, queue, started)) as events:
                async for i, event in events:
                    if event is None:
                        continue
                    piece = event.text or ""
                    finish = event.finish_reason if event.finish_reason in ("stop", "length") else None
                    choice = {"index": i, "finish_reason": finish, "logprobs": None, "token_ids": [event.token],
                              "exits": [event.exit_layer]}
                    if chat:
                        choice["delta"] = {"content": piece}
                    else:
                        choice["text"] = piece
                    yield sse({"choices": [choice]})
            if include_usage:
                yield sse({"choices": [], "usage": usage()})
            yield "data: [DONE]\n\n"
            status = 200
        except Exception as e:  # noqa: BLE001 - the stream has begun: the error goes in it
            error = http_error(e)
            status = error.status
            yield f"data: {json.dumps({'error': {'message': error.message, 'type': error.kind}})}\n\n"
        finally:
            answer(endpoint, status, started)

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


class Tailing:
    """A split's server part: no embedding, no tokenizer; it answers devices on ``/v1/tail`` only."""

    kind = "split server"

    def __init__(self, model, name: str):
        self.model, self.name, self.metrics = model, name, Metrics("decoder")

    def healthy(self) -> bool:
        return True


def _server_part_app(model, name: str, at: int, sessions: int, max_queue: int) -> FastAPI:
    service = Tailing(model, name)
    app = FastAPI(title="eec", docs_url=None, redoc_url=None)
    app.state.service = service

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": name, "kind": service.kind, "pid": os.getpid(),
                "sessions": app.state.tail.sessions}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    for path in ("/v1/completions", "/v1/chat/completions", "/v1/classify"):
        app.post(path)(_wrong_kind("this server runs the layers after a split for devices: POST /v1/tail"))
    _tail_route(app, service, at, sessions, max_queue)
    return app


def _check_type(request: HTTPRequest, content_type: str) -> None:
    if request.headers.get("content-type") != content_type:
        raise InputError(f"a tail request's content type is {content_type}")


def _refused(metrics: Metrics, endpoint: str, e: BaseException, started: float | None = None) -> JSONResponse:
    """The error answer to ``e``, counted (and timed from ``started``) in the metrics."""
    error = http_error(e)
    metrics.requests.labels(endpoint, str(error.status)).inc()
    if started is not None:
        metrics.latency.labels(endpoint).observe(time.perf_counter() - started)
    return error.response()


def _tail_route(app: FastAPI, service: "Decoding | Tailing", at: int, sessions: int, max_queue: int) -> None:
    """``POST /v1/tail``: a split's server part (`eec.runtime.split`). One worker thread runs every
    session's steps (a `Batch` is one thread's); the engine's thread keeps serving completions. Devices'
    requests that wait while a step runs are answered together by the next."""
    from eec.runtime.split import CONTENT_TYPE, TailBehind, TailHost, decode

    host = TailHost(service.model, at, sessions)
    pool = ThreadPoolExecutor(1, thread_name_prefix="eec-tail")
    waiting: list[tuple] = []  # (request, hidden states, answer) waiting for the next step
    busy = [False]
    metrics = service.metrics
    app.state.tail = host

    async def drain() -> None:
        """Requests that arrived while a step ran go together in the next (`TailHost.answer_many`)."""
        busy[0] = True
        try:
            while waiting:
                taken = waiting[:sessions]
                del waiting[: len(taken)]
                try:
                    outs = await asyncio.get_running_loop().run_in_executor(
                        pool, host.answer_many, [(asked, hidden) for asked, hidden, _ in taken])
                except Exception as e:  # noqa: BLE001 - the step itself failed: every request in it learns why
                    outs = [e] * len(taken)
                for (_, _, answer), out in zip(taken, outs):
                    if answer.done():
                        continue
                    if isinstance(out, BaseException):
                        answer.set_exception(out)
                    else:
                        answer.set_result(out)
        finally:
            busy[0] = False

    @app.post("/v1/tail")
    async def tail(request: HTTPRequest):
        started = time.perf_counter()
        try:
            _check_type(request, CONTENT_TYPE)
            if len(waiting) >= max_queue:
                raise Overloaded(f"{len(waiting)} tail requests are waiting already")
            asked, hidden = decode(await request.body())
            answer = asyncio.get_running_loop().create_future()
            waiting.append((asked, hidden, answer))
            if not busy[0]:
                asyncio.get_running_loop().create_task(drain())
            out = await answer
        except TailBehind as behind:
            metrics.requests.labels("/v1/tail", "409").inc()
            return JSONResponse({"error": {"message": str(behind), "type": "session_behind", "param": None,
                                           "code": None}, "length": behind.length}, status_code=409)
        except Exception as e:  # noqa: BLE001
            return _refused(metrics, "/v1/tail", e)
        metrics.requests.labels("/v1/tail", "200").inc()
        metrics.latency.labels("/v1/tail").observe(time.perf_counter() - started)
        metrics.tokens.inc()
        metrics.exits.labels(str(out["exit_layer"])).inc()
        return out


def _classifier_tail_route(app: FastAPI, service: Classifying, at: int) -> None:
    """``POST /v1/classify/tail``: a classifier split's server part (`eec.runtime.split`), on the classifier's
    own worker thread."""
    from eec.runtime.split import CONTENT_TYPE, manifest_fingerprint, decode_classifier

    clf = service.classifier
    first = clf.split_index(at)
    fingerprint = manifest_fingerprint(clf.root)
    metrics = service.metrics

    def run(asked, hidden, side):
        if asked.fingerprint != fingerprint:
            raise InputError("the device runs another artifact than this server (fingerprints differ)")
        later = len(clf.exits) - clf.exits.index(at) - 1
        if asked.thresholds is not None and len(asked.thresholds) != later:
            raise InputError(f"{len(asked.thresholds)} thresholds for the server's {later} exits")
        try:
            return clf.run_tail(first, hidden, side, asked.thresholds, asked.metric)
        except Exception as e:  # onnxruntime's own errors: the shapes sent do not fit these segments
            if not type(e).__module__.startswith("onnxruntime"):
                raise
            raise InputError(f"the hidden states do not fit the segments after stage {at}: "
                             f"{str(e).splitlines()[0][:200]}") from None

    @app.post("/v1/classify/tail")
    async def tail(request: HTTPRequest):
        started = time.perf_counter()
        try:
            _check_type(request, CONTENT_TYPE)
            asked, hidden, side = decode_classifier(await request.body())
            probs, exits = await asyncio.get_running_loop().run_in_executor(service.pool, run, asked, hidden, side)
        except Exception as e:  # noqa: BLE001
            return _refused(metrics, "/v1/classify/tail", e)
        metrics.requests.labels("/v1/classify/tail", "200").inc()
        metrics.latency.labels("/v1/classify/tail").observe(time.perf_counter() - started)
        metrics.samples.inc(len(exits))
        return {"probs": probs.tolist(), "exits": exits.tolist()}
