"""Tiny random-weight models, saved the way users hand them to eec, and compiled once per session."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

TINY_SHAPES = {
    # name: (model_type, config overrides)
    "llama-gqa-untied": ("llama", dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)),
    "llama-mha-tied": ("llama", dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True)),
    "qwen2-gqa-bias": ("qwen2", dict(num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True)),
    "mistral-gqa": ("mistral", dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False, sliding_window=None)),
    # head_dim 8: GroupQueryAttention's CPU kernel needs multiples of 16, so this one compiles to plain ops.
    "llama-gqa-hd8": ("llama", dict(num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=False)),
}


def tiny_config(model_type: str, **overrides):
    from transformers import AutoConfig

    base = dict(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=112,
        num_hidden_layers=6,
        max_position_embeddings=128,
        # Wide initial weights make random models prefer different tokens at
        # different depths, so exits and the final head disagree.
        initializer_range=0.3,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    base.update(overrides)
    return AutoConfig.for_model(model_type, **base)


def tiny_model(model_type: str, seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def llama_src(tmp_path_factory) -> Path:
    """A folder holding a tiny Llama saved as a Hugging Face model under ``hf/``; tests add artifacts beside it."""
    model_type, overrides = TINY_SHAPES["llama-gqa-untied"]
    root = tmp_path_factory.mktemp("llama-src")
    tiny_model(model_type, **overrides).save_pretrained(root / "hf")
    return root


@dataclass
class Compiled:
    hf: torch.nn.Module  # the transformers model the artifact was made from
    artifact: Path
    exits: list[int]


def _compile(tmp_root: Path, name: str, model_type: str, overrides: dict, exits: list[int]) -> Compiled:
    from eec.compiler import compile_model

    hf = tiny_model(model_type, **overrides)
    src = tmp_root / f"{name}-hf"
    hf.save_pretrained(src)
    out = tmp_root / f"{name}.eec"
    compile_model(src, out, exits=exits)
    return Compiled(hf, out, exits)


@pytest.fixture(scope="session", params=sorted(TINY_SHAPES))
def tiny_compiled(request, tmp_path_factory) -> Compiled:
    model_type, overrides = TINY_SHAPES[request.param]
    return _compile(tmp_path_factory.mktemp("tiny"), request.param, model_type, overrides, exits=[2, 4])


@pytest.fixture(scope="session")
def llama_compiled(tmp_path_factory) -> Compiled:
    model_type, overrides = TINY_SHAPES["llama-gqa-untied"]
    return _compile(tmp_path_factory.mktemp("llama"), "llama", model_type, overrides, exits=[1, 3, 4])


@pytest.fixture(scope="session")
def exit_is_final(tmp_path_factory):
    """A Llama whose layers after 2 add nothing to the residual stream (attention output and MLP down
    projections zeroed): the shared head at layer 2 gives the final token, so every draft holds."""
    from eec.compiler import compile_model

    model_type, overrides = TINY_SHAPES["llama-gqa-untied"]
    hf = tiny_model(model_type, **overrides)
    with torch.no_grad():
        for layer in hf.model.layers[2:]:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    root = tmp_path_factory.mktemp("exit-is-final")
    hf.save_pretrained(root / "hf")
    compile_model(root / "hf", root / "a.eec", exits=[2], calibrate=False)
    return root / "a.eec"
