"""The edge–cloud split: the first segments on a device, the rest on a server (numpy and the standard library).

A device opens an artifact with ``load(artifact, split=N, server=URL)``: it runs
the segments up to the exit at layer N and leaves there (or at an earlier exit)
when confident, as early exit always does. A token that does not leave by N
goes to the server, which runs the layers after N for that sequence and
answers with the token. The server keeps, per sequence (a *session*), the KV
of its layers; the device keeps every position's hidden state at layer N, so
that it can send what the server lacks:

- a token that left on the device never reached the server's layers; its
  position is sent with the next token that goes there (the exact catch-up,
  across the wire), so the server's KV is what the full model computes and the
  split decodes the tokens the whole artifact decodes, exit for exit;
- a server that restarted, or dropped the session, answers 409 with the
  positions it has (0), and the device sends the rest again: no session is
  lost silently;
- a server that does not answer within the timeout (or is down) does not stall
  the device: the token comes from the device's last exit (layer N) and is
  flagged (``GenerationResult.fallbacks``); its position is sent with the next
  token that reaches the server. After a failure the device decides alone for
  ``retry_s`` seconds before it tries the server again.

The wire format (version 1): ``POST /v1/tail`` with ``Content-Type:
application/x-eec-tail``; the body is a 4-byte little-endian length, that many
bytes of UTF-8 JSON (`TailRequest`), then ``positions x hidden`` little-endian
float32 values: the hidden states at layer N of positions ``start ..
start + positions - 1`` of the session. The answer is JSON: 200 ``{"token",
"exit_layer", "length"}`` (and ``top_ids``, ``top_logits`` when asked, for
sampling); 409 ``{"error", "length"}``: resend from ``length``; 400: a request
the server cannot take (another artifact: the ``fingerprint``, the manifest's
sha256, differs), which the device reports as an error rather than falling back.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import struct
import threading
import time
import urllib.parse
import uuid
from collections import OrderedDict
from pathlib import Path
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Mapping

import numpy as np

from eec.errors import ArtifactError, EecError, InputError, Overloaded

if TYPE_CHECKING:
    from eec.runtime.core import Batch
    from eec.runtime.model import EarlyExitModel

WIRE_VERSION = 1
CONTENT_TYPE = "application/x-eec-tail"
DEFAULT_TIMEOUT_S = 2.0
RETRY_S = 5.0  # after a failure, the device decides alone this long before trying the server again


def manifest_fingerprint(root) -> str:
    """An artifact's identity on the wire: the sha256 of its manifest (which holds every file's sha256)."""
    return hashlib.sha256((Path(root) / "manifest.json").read_bytes()).hexdigest()


def fingerprint(model: "EarlyExitModel") -> str:
    """A decoder's identity on the wire; a part written by `eec split` carries its whole artifact's."""
    part = model.manifest.part
    return part.whole if part is not None else manifest_fingerprint(model.root)


def split_index(model: "EarlyExitModel", at: int) -> int:
    """How many of the artifact's segments run on the device for a split after layer ``at`` (an exit):
    the index of the server's first segment."""
    if isinstance(at, bool) or not isinstance(at, int):
        raise InputError(f"split must be an exit's layer, got {at!r}")
    part = model.manifest.part
    if part is not None:
        if at != part.at:
            raise InputError(f"this artifact is the {part.role} part of a split at layer {part.at}, not {at}")
        return len(model.manifest.segments) if part.role == "device" else 0
    for k, spec in enumerate(model.manifest.segments[:-1]):
        if spec.exit is not None and spec.exit.layer == at:
            return k + 1
    raise InputError(f"the split must be at an exit; this artifact's exits are {model.exits}")


@dataclass
class TailRequest:
    session: str
    start: int  # the first position sent
    positions: int
    hidden: int
    fingerprint: str
    thresholds: dict[str, float] | None = None  # the server's exits: layer -> τ; None: its final head
    metric: int = 0
    top: bool = False  # return the deciding head's top tokens and logits (sampling)
    version: int = WIRE_VERSION


def encode(request: TailRequest, hidden: np.ndarray) -> bytes:
    header = json.dumps(asdict(request)).encode()
    return struct.pack("<I", len(header)) + header + np.ascontiguousarray(hidden, dtype="<f4").tobytes()


def _frame(body: bytes, kind: type):
    """The header (as ``kind``) and payload of a framed request; a malformed one is an `InputError`."""
    if len(body) < 4:
        raise InputError("the body is too short to be a tail request")
    (size,) = struct.unpack("<I", body[:4])
    if size > len(body) - 4 or size > 1 << 20:
        raise InputError("the tail request's header length is wrong")
    try:
        request = kind(**json.loads(body[4: 4 + size]))
    except (ValueError, TypeError):
        raise InputError("the tail request's header is not a version-1 header") from None
    if request.version != WIRE_VERSION:
        raise InputError(f"wire version {request.version} is not supported (this server speaks {WIRE_VERSION})")
    return request, body[4 + size:]


def decode(body: bytes) -> tuple[TailRequest, np.ndarray]:
    """A request from the wire; anything malformed is an `InputError` (a 400)."""
    request, payload = _frame(body, TailRequest)
    for name in ("start", "positions", "hidden", "metric"):
        value = getattr(request, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InputError(f"{name} must be a whole number, got {value!r}")
    if not isinstance(request.session, str) or not 0 < len(request.session) <= 128:
        raise InputError("session must be a short text")
    if request.positions < 1 or len(payload) != request.positions * request.hidden * 4:
        raise InputError(f"the payload holds {len(payload)} bytes, not {request.positions} x {request.hidden} float32")
    hidden = np.frombuffer(payload, dtype="<f4").reshape(request.positions, request.hidden)
    if not np.isfinite(hidden).all():
        raise InputError("the hidden states hold NaN or infinite values")
    return request, hidden.astype(np.float32)


class TailUnavailable(EecError):
    """The server did not answer (down, timed out, or failing): the device falls back to its own exit."""


class TailBehind(EecError):
    """The server has fewer positions of the session than were sent (it restarted or dropped it)."""

    def __init__(self, length: int):
        super().__init__(f"the server has {length} positions of this session")
        self.length = length


@dataclass
class TailAnswer:
    token: int
    exit_layer: int
    top_ids: np.ndarray | None = None
    top_logits: np.ndarray | None = None


class RemoteTail:
    """The device's side: sends a session's hidden states to the server's ``/v1/tail`` and reads the token."""

    def __init__(self, url: str, fingerprint: str, timeout: float = DEFAULT_TIMEOUT_S, retry_s: float = RETRY_S):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise InputError(f"server must be an http(s) URL, got {url!r}")
        if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or timeout <= 0:
            raise InputError(f"timeout must be a number of seconds above 0, got {timeout!r}")
        self.parts, self.fingerprint, self.timeout, self.retry_s = parts, fingerprint, float(timeout), retry_s
        self.path = parts.path.rstrip("/") + "/v1/tail"
        self._connection: http.client.HTTPConnection | None = None
        self._down_until = 0.0
        self._lock = threading.Lock()  # one request at a time on the kept connection

    def _connect(self) -> http.client.HTTPConnection:
        if self._connection is None:
            kind = http.client.HTTPSConnection if self.parts.scheme == "https" else http.client.HTTPConnection
            self._connection = kind(self.parts.hostname, self.parts.port, timeout=self.timeout)
        return self._connection

    def run(self, session: str, start: int, hidden: np.ndarray, thresholds: Mapping[int, float] | None,
            metric: int, top: bool) -> TailAnswer:
        """The server's token for the last of ``hidden``'s positions (which begin at ``start``)."""
        request = TailRequest(session, start, hidden.shape[0], hidden.shape[1], self.fingerprint,
                              None if thresholds is None else {str(k): float(v) for k, v in thresholds.items()},
                              metric, top)
        status, data = self._post(encode(request, hidden))
        answer = json.loads(data)
        out = TailAnswer(int(answer["token"]), int(answer["exit_layer"]))
        if "top_ids" in answer:
            out.top_ids = np.asarray(answer["top_ids"], dtype=np.int64)
            out.top_logits = np.asarray(answer["top_logits"], dtype=np.float32)
        return out

    def _post(self, body: bytes) -> tuple[int, bytes]:
        """The server's 200 answer; `TailBehind` (409), `ArtifactError` (400) or `TailUnavailable`."""
        if time.monotonic() < self._down_until:
            raise TailUnavailable("the server failed recently; deciding on the device")
        with self._lock:
            try:
                connection = self._connect()
                connection.request("POST", self.path, body, {"Content-Type": CONTENT_TYPE})
                response = connection.getresponse()
                status, data = response.status, response.read()
            except (OSError, http.client.HTTPException) as e:
                self._drop()
                raise TailUnavailable(f"the server did not answer: {e}") from None
        if status == 409:
            raise TailBehind(int(json.loads(data)["length"]))
        if status == 400:
            message = json.loads(data).get("error", {}).get("message", "bad request")
            raise ArtifactError(f"the server refused the split's request: {message}")
        if status != 200:
            self._drop()
            raise TailUnavailable(f"the server answered {status}")
        return status, data

    def _drop(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None
        self._down_until = time.monotonic() + self.retry_s

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None


def new_session() -> str:
    return uuid.uuid4().hex


class TailHost:
    """The server's side: the segments after the split for many sessions, one `Batch` row each.

    Sessions beyond ``sessions`` evict the least recently used one (its
    device resends from position 0 when it comes back: 409). Requests of
    several devices run as one step (`answer_many`): rows that add one
    position share a call per segment, as in the batched engine. Calls come
    from one thread at a time (the server's worker)."""

    def __init__(self, model: "EarlyExitModel", at: int, sessions: int = 64, capacity: int = 256):
        self.model, self.at = model, at
        self.first = split_index(model, at)
        self.fingerprint = model.fingerprint
        self.batch: "Batch" = model.new_batch(sessions, capacity, segments=slice(self.first, None))
        self.hidden = model.manifest.model.hidden_size
        self.slots: OrderedDict[str, int] = OrderedDict()  # session -> row, least recently used first
        self.free = list(range(sessions))[::-1]
        self.steps = self.rows = 0  # steps run, and the rows they held (rows / steps: the batching achieved)

    def answer(self, request: TailRequest, hidden: np.ndarray) -> dict:
        """The token for the session's last position sent; `TailBehind` when positions are missing."""
        out = self.answer_many([(request, hidden)])[0]
        if isinstance(out, BaseException):
            raise out
        return out

    def answer_many(self, asked: list[tuple[TailRequest, np.ndarray]]) -> list:
        """Each request's answer (or the error that is its alone), the valid ones run as one step per
        metric; a session asked twice answers its second request in the next round."""
        out: list = [None] * len(asked)
        rounds: list[list[int]] = [[]]
        for i, (request, _) in enumerate(asked):
            for members in rounds:
                if all(asked[j][0].session != request.session for j in members):
                    members.append(i)
                    break
            else:
                rounds.append([i])
        for members in rounds:
            held: set[int] = set()  # rows of this round: never evicted to admit another
            go: dict[int, list[tuple[int, int, dict | None]]] = {}  # metric -> (request, row, thresholds)
            for i in members:
                request, hidden = asked[i]
                try:
                    slot, thresholds = self._check(request, held)
                except (InputError, TailBehind, EecError) as e:
                    out[i] = e
                    continue
                held.add(slot)
                go.setdefault(request.metric, []).append((i, slot, thresholds))
            for metric, rows in go.items():
                self.steps, self.rows = self.steps + 1, self.rows + len(rows)
                results = self.batch.step([slot for _, slot, _ in rows], [asked[i][1] for i, _, _ in rows],
                                          [t for _, _, t in rows], metric, sample=[asked[i][0].top for i, _, _ in rows])
                for (i, slot, _), result in zip(rows, results):
                    answer = {"token": result.token, "exit_layer": result.exit_layer, "length": self.batch.length(slot)}
                    if asked[i][0].top and result.top_ids is not None:
                        answer["top_ids"], answer["top_logits"] = result.top_ids.tolist(), result.top_logits.tolist()
                    out[i] = answer
        return out

    def _check(self, request: TailRequest, held: set[int]) -> tuple[int, dict[int, float] | None]:
        """The request's row (admitted if new) and thresholds, or the error that is its answer."""
        if request.fingerprint != self.fingerprint:
            raise InputError("the device runs another artifact than this server (fingerprints differ)")
        if request.hidden != self.hidden:
            raise InputError(f"hidden states of {request.hidden} values; this model's have {self.hidden}")
        slot = self.slots.get(request.session)
        length = 0 if slot is None else self.batch.length(slot)
        if request.start != length:
            raise TailBehind(length)
        if length + request.positions >= self.model.manifest.model.context_length:
            raise InputError("the session is longer than the model's context")
        if slot is None:
            slot = self._admit(request.session, held)
        self.slots.move_to_end(request.session)
        if request.thresholds is None:
            return slot, None
        return slot, {int(k): float(v) for k, v in request.thresholds.items()}

    def _admit(self, session: str, held: set[int]) -> int:
        if not self.free:
            victim = next((s for s, row in self.slots.items() if row not in held), None)
            if victim is None:
                raise Overloaded("every session's row is in this step; try again")
            row = self.slots.pop(victim)
            self.batch.release(row)
            self.free.append(row)
        slot = self.free.pop()
        self.slots[session] = slot
        return slot

    @property
    def sessions(self) -> int:
        return len(self.slots)


# --- classifiers ----------------------------------------------------------------------------------------------
#
# A classifier's split has no sessions: a sample that does not leave on the device sends its hidden state
# (and a text classifier's padding mask) and gets its answer. ``POST /v1/classify/tail``, the same framing:
# a 4-byte length, a JSON header (`ClassifierTailRequest`), then the hidden states as float32 and each side
# input (``side``, in the header's order) as int64, all little-endian. The answer is JSON ``{"probs":
# [[...]], "exits": [...]}``: each sample's class probabilities and the stage it left after.


@dataclass
class ClassifierTailRequest:
    fingerprint: str
    shape: list[int]  # the hidden states': [samples, ...]
    side: dict[str, list[int]]  # name -> shape of each int64 side input (a text classifier's mask)
    thresholds: list[float] | None = None  # the server's exits', in order; None: full mode
    metric: str | None = None
    version: int = WIRE_VERSION


def encode_classifier(request: ClassifierTailRequest, hidden: np.ndarray, side: dict[str, np.ndarray]) -> bytes:
    header = json.dumps(asdict(request)).encode()
    parts = [struct.pack("<I", len(header)), header, np.ascontiguousarray(hidden, dtype="<f4").tobytes()]
    parts += [np.ascontiguousarray(side[name], dtype="<i8").tobytes() for name in request.side]
    return b"".join(parts)


def decode_classifier(body: bytes) -> tuple[ClassifierTailRequest, np.ndarray, dict[str, np.ndarray]]:
    request, payload = _frame(body, ClassifierTailRequest)
    try:
        shapes = [request.shape, *request.side.values()]
        if not all(isinstance(d, int) and not isinstance(d, bool) and 0 < d < 1 << 24 for s in shapes for d in s):
            raise ValueError
    except (ValueError, TypeError, AttributeError):
        raise InputError("the tail request's shapes are not lists of sizes") from None
    sizes = [int(np.prod(request.shape)) * 4] + [int(np.prod(s)) * 8 for s in request.side.values()]
    if len(payload) != sum(sizes):
        raise InputError(f"the payload holds {len(payload)} bytes, not the {sum(sizes)} its header describes")
    hidden = np.frombuffer(payload[: sizes[0]], dtype="<f4").reshape(request.shape).astype(np.float32)
    if not np.isfinite(hidden).all():
        raise InputError("the hidden states hold NaN or infinite values")
    side, at = {}, sizes[0]
    for (name, shape), length in zip(request.side.items(), sizes[1:]):
        side[name] = np.frombuffer(payload[at: at + length], dtype="<i8").reshape(shape).astype(np.int64)
        at += length
    return request, hidden, side


class RemoteClassifierTail(RemoteTail):
    """A classifier device's side: the samples that stay after its last exit, sent for their answers."""

    def __init__(self, url: str, fingerprint: str, timeout: float = DEFAULT_TIMEOUT_S, retry_s: float = RETRY_S):
        super().__init__(url, fingerprint, timeout, retry_s)
        self.path = self.parts.path.rstrip("/") + "/v1/classify/tail"

    def run(self, hidden: np.ndarray, side: dict[str, np.ndarray], thresholds: list[float] | None,
            metric: str | None) -> tuple[np.ndarray, np.ndarray]:
        request = ClassifierTailRequest(self.fingerprint, list(hidden.shape), {k: list(v.shape) for k, v in side.items()},
                                        thresholds, metric)
        status, data = self._post(encode_classifier(request, hidden, side))
        answer = json.loads(data)
        return np.asarray(answer["probs"], dtype=np.float32), np.asarray(answer["exits"], dtype=np.int64)
