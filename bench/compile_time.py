"""Compile time of a tiny random Llama (6 layers, exits at 2 and 4, no calibration), with torch.onnx's
translation registry built once a process (eec's default) and rebuilt on every graph's export
(torch.onnx's own behaviour), both exporting every graph, and a repeat compile whose graphs come from
the process's export cache (`eec.compiler.export_cache`), alternating in one process after a warm-up
compile; medians.

    .venv/bin/python bench/compile_time.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

import eec.compiler.export as export
from eec.compiler import compile_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp())
    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=6,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    AutoModelForCausalLM.from_config(config).save_pretrained(root / "hf")
    cached = export._registry_built_once

    limit = export.EXPORTS.limit

    def once(rebuild: bool, kept: bool = False) -> float:
        export._registry_built_once = contextlib.nullcontext if rebuild else cached
        export.EXPORTS.limit = limit if kept else 0
        shutil.rmtree(root / "out.eec", ignore_errors=True)
        start = time.perf_counter()
        compile_model(root / "hf", root / "out.eec", exits=[2, 4], calibrate=False)
        return time.perf_counter() - start

    once(False)  # warm-up: imports, and the registry built once
    once(False, kept=True)  # fills the export cache
    times = {False: [], True: [], "kept": []}
    for _ in range(args.rounds):
        for rebuild in (True, False):
            times[rebuild].append(once(rebuild))
        times["kept"].append(once(False, kept=True))
    shutil.rmtree(root, ignore_errors=True)
    cached_s, rebuilt_s = statistics.median(times[False]), statistics.median(times[True])
    kept_s = statistics.median(times["kept"])
    print(f"compile, registry rebuilt per graph: {rebuilt_s:.2f} s; built once: {cached_s:.2f} s "
          f"({rebuilt_s / cached_s:.2f}x); again from the export cache: {kept_s:.2f} s ({cached_s / kept_s:.2f}x "
          f"the registry built once), median of {args.rounds}")


if __name__ == "__main__":
    main()
