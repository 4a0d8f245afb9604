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
                         "Face model directory, a .gguf file, a model.pt from `eec train`, or a branched classifier from "
                         "eec.compiler.save_early_exit (docs/format.md)") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise InputError(f"{path} is not an eec checkpoint (expected a dict with format={FORMAT!r}; see docs/format.md)")
    if raw.get("version") != VERSION:
        raise InputError(f"{path}: checkpoint version {raw.get('version')} is not supported (expected {VERSION})")
    base = raw.get("base")
    if not isinstance(base, dict) or not ("path" in base or {"config", "state_dict"} <= base.keys()):
        raise InputError(f"{path}: 'base' must hold either 'path' or both 'config' and 'state_dict'")
    if "path" in base and not isinstance(base["path"], str):
        raise InputError(f"{path}: base 'path' must be text, got {type(base['path']).__name__}")
    if "path" not in base:
        if not isinstance(base["config"], dict):
            raise InputError(f"{path}: base 'config' must be a dict, got {type(base['config']).__name__}")
        state = base["state_dict"]
        if not (isinstance(state, dict) and all(isinstance(k, str) and _tensor(v) for k, v in state.items())):
            raise InputError(f"{path}: base 'state_dict' must map parameter names to floating-point tensors")
    raw_exits = raw.get("exits") or []
    if not isinstance(raw_exits, list):
        raise InputError(f"{path}: 'exits' must be a list of heads, got {type(raw_exits).__name__}")
    exits = [_head(e, i, path) for i, e in enumerate(raw_exits)]
    tokenizer = raw.get("tokenizer")
    if tokenizer is not None and not (isinstance(tokenizer, dict) and isinstance(tokenizer.get("json"), str) and all(
            tokenizer.get(k) is None or isinstance(tokenizer[k], str) for k in ("chat_template", "bos_token", "eos_token"))):
        raise InputError(f"{path}: 'tokenizer' must be a dict with 'json' (and optional chat_template, bos_token, "
                         "eos_token) as text")
    metadata = raw.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise InputError(f"{path}: 'metadata' must be a dict, got {type(metadata).__name__}")
    eos = metadata.get("eos_token_ids")
    if eos is not None and not (isinstance(eos, list) and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                                                              for t in eos)):
        raise InputError(f"{path}: metadata 'eos_token_ids' must be a list of token ids, got {eos!r}")
    return Checkpoint(base=base, exits=exits, tokenizer=tokenizer, metadata=metadata)


def _tensor(value, dims: int | None = None) -> bool:
    return isinstance(value, torch.Tensor) and value.is_floating_point() and (dims is None or value.dim() == dims)


def _head(e, i: int, path: Path) -> HeadWeights:
    """Exit head ``i`` of the checkpoint, its fields typed (shapes are checked against the model later)."""
    if not (isinstance(e, dict) and isinstance(e.get("state_dict"), dict)):
        raise InputError(f"{path}: exit head {i} must be a dict with 'layer' and 'state_dict'")
    layer, kind, state = e.get("layer"), e.get("kind", "norm+linear"), e["state_dict"]
    if not isinstance(layer, int) or isinstance(layer, bool):
        raise InputError(f"{path}: exit head {i}'s layer must be a whole number, got {layer!r}")
    if kind not in HEAD_KINDS:
        raise InputError(f"{path}: exit head at layer {layer} has unknown kind {kind!r} (known: {', '.join(HEAD_KINDS)})")
    for name, dims, required in (("norm.weight", 1, True), ("proj.weight", 2, True), ("proj.bias", 1, False)):
        if (required or state.get(name) is not None) and not _tensor(state.get(name), dims):
            raise InputError(f"{path}: exit head at layer {layer}: {name!r} must be a {dims}-D floating-point tensor, "
                             f"got {type(state.get(name)).__name__}")
    return HeadWeights(layer, kind, state["norm.weight"], state["proj.weight"], state.get("proj.bias"))
