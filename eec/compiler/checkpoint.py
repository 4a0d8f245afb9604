"""The eec checkpoint ``model.pt``: a plain dict for ``torch.save``.

Read with ``torch.load(weights_only=True)``, so it may hold only tensors,
numbers, strings, lists, dicts and None. The schema is in docs/format.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from eec.errors import InputError

FORMAT = "eec-checkpoint"
VERSION = 1
HEAD_KINDS = ("norm+linear",)


@dataclass
class HeadWeights:
    """A trained exit head: RMSNorm weight [hidden] and projection [vocab, hidden] (+ bias)."""

    layer: int
    kind: str
    norm_weight: torch.Tensor
    proj_weight: torch.Tensor
    proj_bias: torch.Tensor | None = None

    def to_dict(self) -> dict[str, Any]:
        state = {"norm.weight": self.norm_weight, "proj.weight": self.proj_weight}
        if self.proj_bias is not None:
            state["proj.bias"] = self.proj_bias
        return {"layer": self.layer, "kind": self.kind, "state_dict": state}


@dataclass
class Checkpoint:
    base: dict[str, Any]  # {"path": str} or {"config": dict, "state_dict": dict}
    exits: list[HeadWeights]
    tokenizer: dict[str, Any] | None  # {"json": str, "chat_template": str | None, ...}
    metadata: dict[str, Any]


def save_checkpoint(ckpt: Checkpoint, path: Path) -> None:
    body = {
        "format": FORMAT,
        "version": VERSION,
        "base": ckpt.base,
        "exits": [h.to_dict() for h in ckpt.exits],
        "tokenizer": ckpt.tokenizer,
        "metadata": ckpt.metadata,
    }
    torch.save(body, path)


def load_checkpoint(path: Path) -> Checkpoint:
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a file that is not a checkpoint
        raise InputError(f"{path} is not a readable eec checkpoint ({type(e).__name__}); eec compiles a Hugging "
                         "Face model directory, a .gguf file or a model.pt from `eec train`") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise InputError(f"{path} is not an eec checkpoint (expected a dict with format={FORMAT!r}; see docs/format.md)")
    if raw.get("version") != VERSION:
        raise InputError(f"{path}: checkpoint version {raw.get('version')} is not supported (expected {VERSION})")
    base = raw.get("base")
    if not isinstance(base, dict) or not ("path" in base or {"config", "state_dict"} <= base.keys()):
        raise InputError(f"{path}: 'base' must hold either 'path' or both 'config' and 'state_dict'")
    exits = []
    for i, e in enumerate(raw.get("exits") or []):
        try:
            state = e["state_dict"]
            head = HeadWeights(
                layer=int(e["layer"]),
                kind=str(e.get("kind", "norm+linear")),
                norm_weight=state["norm.weight"],
                proj_weight=state["proj.weight"],
                proj_bias=state.get("proj.bias"),
            )
        except (KeyError, TypeError) as err:
            raise InputError(f"{path}: exit head {i} is malformed (missing {err})") from None
        if head.kind not in HEAD_KINDS:
            raise InputError(f"{path}: exit head at layer {head.layer} has unknown kind {head.kind!r} (known: {', '.join(HEAD_KINDS)})")
        exits.append(head)
    return Checkpoint(base=base, exits=exits, tokenizer=raw.get("tokenizer"), metadata=raw.get("metadata") or {})
