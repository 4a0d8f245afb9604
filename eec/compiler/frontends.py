"""Front-ends: turn what the user points at into one `SourceModel`.

Three inputs are accepted, all from local files (nothing is downloaded):

1. a Hugging Face model directory (``config.json`` + weights),
2. a ``.gguf`` file, read through transformers (``gguf_file=``),
3. an eec checkpoint ``model.pt`` (docs/format.md), whose base is either
   embedded (config + state dict) or a path to 1. or 2.

Only Llama-family decoders are compiled; anything else is refused here,
before any weights are read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from eec.compiler.checkpoint import HeadWeights, load_checkpoint
from eec.errors import InputError, UnsupportedModelError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
SUPPORTED = {"llama": "Llama / SmolLM2", "mistral": "Mistral", "qwen2": "Qwen2"}


@dataclass
class TokenizerData:
    json: str  # tokenizer.json contents, for the `tokenizers` library
    chat_template: str | None
    bos_token: str | None
    eos_token: str | None


@dataclass
class SourceModel:
    model: nn.Module  # a transformers *ForCausalLM in fp32, eval mode
    tokenizer: TokenizerData | None
    eos_token_ids: list[int]
    heads: dict[int, HeadWeights] = field(default_factory=dict)  # trained exit heads by layer
    source: str = ""

    @property
    def config(self):
        return self.model.config


def load_source(path: str | os.PathLike) -> SourceModel:
    path = Path(path)
    if not path.exists():
        raise InputError(f"no such file or directory: {path}")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise InputError(f"{path} is a directory but not a Hugging Face model (no config.json)")
        return _load_hf(path, gguf_file=None)
    if path.suffix.lower() == ".gguf":
        return _load_hf(path.parent, gguf_file=path.name)
    return _load_checkpoint(path)


SIZES = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "vocab_size")


def _check_config(config, where: str) -> None:
    _check_model_type(getattr(config, "model_type", None), where)
    for name in SIZES:
        value = getattr(config, name, None)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise InputError(f"{where}: config {name} must be a whole number of at least 1, got {value!r}")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise UnsupportedModelError(f"{where}: activation {config.hidden_act!r} is not supported (only silu)")


def _check_model_type(model_type: str | None, where: str) -> None:
    if model_type not in SUPPORTED:
        names = ", ".join(f"{k} ({v})" for k, v in SUPPORTED.items())
        raise UnsupportedModelError(f"{where}: architecture {model_type!r} is not supported; eec compiles {names}")


def _hf_kwargs(gguf_file: str | None) -> dict:
    kwargs = {"local_files_only": True}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    return kwargs


def _load_hf(directory: Path, gguf_file: str | None) -> SourceModel:
    from transformers import AutoConfig, AutoModelForCausalLM

    where = str(directory / gguf_file) if gguf_file else str(directory)
    try:
        config = AutoConfig.from_pretrained(directory, **_hf_kwargs(gguf_file))
    except Exception as e:  # transformers raises ValueError/OSError/KeyError for bad files
        kind = "GGUF file" if gguf_file else "Hugging Face model directory"
        raise InputError(f"{where} is not a readable {kind} ({_first_line(e)})") from None
    _check_config(config, where)
    try:
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, **_hf_kwargs(gguf_file))
    except Exception as e:
        raise InputError(f"could not load the weights of {where} ({_first_line(e)})") from None
    return SourceModel(
        model=model.eval(),
        tokenizer=_load_tokenizer(directory, gguf_file),
        eos_token_ids=_eos_ids(model),
        source=where,
    )


def _load_tokenizer(directory: Path, gguf_file: str | None) -> TokenizerData | None:
    from transformers import AutoTokenizer

    # transformers builds an empty default tokenizer for some model types when
    # a directory has no tokenizer files; that is no tokenizer at all.
    if gguf_file is None and not any((directory / f).is_file() for f in TOKENIZER_FILES):
        return None
    try:
        tok = AutoTokenizer.from_pretrained(directory, **_hf_kwargs(gguf_file))
        backend = tok.backend_tokenizer
    except Exception as e:  # noqa: BLE001 - transformers raises many types for unreadable tokenizer files
        if gguf_file is not None:
            return None  # a GGUF without tokenizer metadata compiles; its artifact takes token ids
        raise InputError(f"{directory} has tokenizer files that cannot be read ({_first_line(e)}); mend or remove "
                         "them (without them the artifact takes token ids)") from None
    return TokenizerData(
        json=backend.to_str(),
        chat_template=getattr(tok, "chat_template", None),
        bos_token=tok.bos_token,
        eos_token=tok.eos_token,
    )


def _eos_ids(model: nn.Module) -> list[int]:
    for holder in (getattr(model, "generation_config", None), model.config):
        eos = getattr(holder, "eos_token_id", None)
        if eos is not None:
            return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]
    return []


def _load_checkpoint(path: Path) -> SourceModel:
    ckpt = load_checkpoint(path)
    base = ckpt.base
    if "path" in base:
        base_path = Path(base["path"])
        if not base_path.is_absolute():
            base_path = path.parent / base_path
        src = load_source(base_path)
    else:
        src = _from_embedded(base, str(path))
    src.source = str(path)
    if ckpt.tokenizer:
        t = ckpt.tokenizer
        src.tokenizer = TokenizerData(
            json=t["json"], chat_template=t.get("chat_template"), bos_token=t.get("bos_token"), eos_token=t.get("eos_token")
        )
    if ckpt.metadata.get("eos_token_ids") is not None:
        src.eos_token_ids = [int(i) for i in ckpt.metadata["eos_token_ids"]]
    src.heads = {h.layer: _check_head(h, src.config, path) for h in ckpt.exits}
    return src


def _from_embedded(base: dict, where: str) -> SourceModel:
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(base["config"])
    model_type = cfg.pop("model_type", None)
    cfg.pop("quantization_config", None)  # embedded weights are plain tensors
    _check_model_type(model_type, where)
    try:
        config = AutoConfig.for_model(model_type, **cfg)
    except Exception as e:  # noqa: BLE001 - transformers' strict config dataclasses raise their own types
        detail = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
        raise InputError(f"{where}: the base model's config is not usable ({detail})") from None
    _check_config(config, where)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    try:
        missing, unexpected = model.load_state_dict(base["state_dict"], strict=False)
    except RuntimeError as e:  # a tensor of the wrong shape; torch's first line only names the class
        detail = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line), _first_line(e))
        raise InputError(f"{where}: base weights do not fit the config ({detail})") from None
    # Tied LM heads are legitimately absent from a saved state dict.
    missing = [m for m in missing if not (m == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise InputError(f"{where}: base weights do not fit the config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    if config.tie_word_embeddings:
        model.tie_weights()
    return SourceModel(model=model.eval(), tokenizer=None, eos_token_ids=_eos_ids(model), source=where)


def _check_head(head: HeadWeights, config, where: Path) -> HeadWeights:
    n_layers, hidden, vocab = config.num_hidden_layers, config.hidden_size, config.vocab_size
    if not 1 <= head.layer < n_layers:
        raise InputError(f"{where}: exit head at layer {head.layer} is outside 1..{n_layers - 1}")
    if tuple(head.norm_weight.shape) != (hidden,) or tuple(head.proj_weight.shape) != (vocab, hidden):
        raise InputError(
            f"{where}: exit head at layer {head.layer} has shapes norm {tuple(head.norm_weight.shape)}, "
            f"proj {tuple(head.proj_weight.shape)}; the base model needs ({hidden},) and ({vocab}, {hidden})"
        )
    return head


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__
