"""The exit-trained code model recipe (examples/code_lm/train.py), run tiny: it learns, and eec compiles it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from eec.compiler import compile_model
from eec.runtime import load
from tests.reference import hf_greedy

SCRIPT = Path(__file__).parents[1] / "examples" / "code_lm" / "train.py"


@pytest.mark.slow  # 30 s of training; the layer-weighted loss and compiling checkpoints are tested on their own
def test_tiny_code_model_trains_and_compiles(tmp_path):
    out = tmp_path / "code-lm"
    run = subprocess.run([sys.executable, str(SCRIPT), "-o", str(out), "--tiny"], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    first = [float(v) for v in re.search(r"first step's per-layer training loss: (.*)", run.stdout).group(1).split()]
    held = [float(m) for m in re.findall(r"^\s+\d+\s+([\d.]+)\s+[\d.]+$", run.stdout, re.M)]
    assert len(held) == len(first) == 2
    assert all(h < f - 1.0 for h, f in zip(held, first))  # every layer learned, on modules it never saw
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(out)
    manifest = compile_model(out, tmp_path / "code.eec", exits=[1], calibrate=False)
    assert manifest.tokenizer is not None and manifest.model.num_layers == 2
    model = load(tmp_path / "code.eec")
    prompt = tok("def main():\n    ")["input_ids"]
    assert model.encode("def main():\n    ", chat=False) == prompt
    assert model.generate(prompt, max_new_tokens=12, mode="full").tokens == hf_greedy(hf, prompt, 12)


def _recipe():
    import importlib.util

    spec = importlib.util.spec_from_file_location("code_lm_train", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_distillation_adds_each_exits_kl_to_the_last_layer():
    from transformers import LlamaConfig, LlamaForCausalLM

    recipe = _recipe()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
                         initializer_range=0.3)
    model = LlamaForCausalLM(config).eval()
    x, y = torch.randint(0, 50, (2, 7)), torch.randint(0, 50, (2, 7))
    plain, per_layer = recipe.layer_weighted_loss(model, x, y, 0.0)
    # CALM's weights by hand: layer l counts l / (1 + 2 + 3)
    assert float(plain.detach()) == pytest.approx(sum((i + 1) * v for i, v in enumerate(per_layer)) / 6, rel=1e-5)
    uniform, _ = recipe.layer_weighted_loss(model, x, y, 0.0, "uniform")
    assert float(uniform.detach()) == pytest.approx(sum(per_layer) / 3, rel=1e-5)  # every layer alike
    mixed, _ = recipe.layer_weighted_loss(model, x, y, 0.5)
    with torch.no_grad():
        hidden = model.model(input_ids=x, output_hidden_states=True).hidden_states[1:]
        logp = [torch.log_softmax(model.lm_head(h if i == 2 else model.model.norm(h)), -1).flatten(0, 1)
                for i, h in enumerate(hidden)]
        kl = [float((logp[2].exp() * (logp[2] - lp)).sum(-1).mean()) for lp in logp[:2]]  # per token, averaged
    assert float((mixed - plain).detach()) == pytest.approx(0.5 * sum(kl) / 2, rel=1e-3)
    assert min(kl) > 0  # a random model's exits disagree with its last layer: the term is not vacuous
