"""What one request asks of a generation, as one object (`GenerationOptions`).

`EarlyExitModel.generate`, `eec.runtime.engine.Engine.submit`, the server and the command line all
build one of these and hand it on whole; the model checks it against the artifact when it makes the
request (`EarlyExitModel.make_request`: thresholds against its exits, sampling against its heads, stop
strings against its tokenizer). How a whole generation runs (``stream``, ``catch_up``, ``monitor``,
``max_batch``, speculative mode's ``max_draft`` and ``draft_layer``) and the confidence metric, which
every row of a batch shares, are the caller's arguments, not a request's.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from eec.errors import InputTypeError


@dataclass(frozen=True)
class GenerationOptions:
    """One request's options; `EarlyExitModel.generate` says what each does.

    ``dataclasses.replace(options, temperature=0.7)`` derives another; ``generate(prompt, options,
    max_new_tokens=16)`` does the same for one call.
    """

    max_new_tokens: int = 128
    mode: str = "early-exit"  # "early-exit", "full" or "speculative"
    thresholds: float | Sequence[float] | Mapping[int, float] | None = None  # or epsilon, not both
    epsilon: float | None = None
    rule: str = "risk"  # the threshold rule for epsilon: "risk" or "valade"
    delta: float = 0.1  # the risk rule's δ
    chat: bool | None = None  # None: wrap a text prompt in the chat template where the model has one
    ignore_eos: bool = False
    stop: str | Sequence[str] | None = None
    temperature: float | None = None  # any of these four: sample instead of taking the most likely token
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    @classmethod
    def of(cls, options: "GenerationOptions | None", changes: Mapping[str, Any]) -> "GenerationOptions":
        """``options`` (the defaults when None) with ``changes`` by field name; a name that is no field is a
        TypeError, not an option silently left at its default."""
        if options is None:
            options = cls()
        elif not isinstance(options, cls):
            raise InputTypeError(f"options must be a GenerationOptions, got {type(options).__name__}")
        return dataclasses.replace(options, **changes) if changes else options
