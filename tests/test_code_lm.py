"""The exit-trained code model recipe (examples/code_lm/train.py), run tiny: it learns, and eec compiles it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import torch

from eec.compiler import compile_model
from eec.runtime import load
from tests.reference import hf_greedy

SCRIPT = Path(__file__).parents[1] / "examples" / "code_lm" / "train.py"


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
