"""Quality cost of each precision on SmolLM2-135M-Instruct: teacher-forced agreement of its `full` mode
with the fp32 `full` mode, and its full-mode speed, on held-out prompts. Usage:

    .venv/bin/python bench/precision_agreement.py [--work bench-work] [--prompts 8] [--tokens 64]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from full_vs_transformers import smollm2_gguf  # noqa: E402

from eec.calib.calibrate import read_prompt_lines  # noqa: E402
from eec.compiler import compile_model  # noqa: E402
from eec.runtime import load  # noqa: E402
from eec.runtime.evaluate import agreement  # noqa: E402

VARIANTS = [("fp32", {}), ("int8", {}), ("int8-dynamic", {}), ("int4", {"block_size": 32}), ("int4", {"block_size": 16}),
            ("int4-gguf", {"block_size": 32})]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("bench-work"))
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    work = args.work.absolute()
    work.mkdir(exist_ok=True)
    gguf = smollm2_gguf()
    models = {}
    for precision, options in VARIANTS:
        name = precision + (f"-b{options['block_size']}" if options else "")
        path = work / f"smollm2-{name}-full.eec"
        if not path.exists():
            print(f"compiling {name} ...", flush=True)
            compile_model(gguf, path, exits=[], precision=precision, calibrate=False, **options)
        models[name] = load(path)
    reference = models["fp32"]
    texts = read_prompt_lines(Path(__file__).parent / "heldout_prompts.txt")[: args.prompts]
    prompts = [reference.encode(t) for t in texts]
    continuations = [reference.generate(p, max_new_tokens=args.tokens, mode="full", ignore_eos=True).tokens
                     for p in prompts]
    print(f"\nSmolLM2-135M-Instruct, {len(prompts)} held-out prompts x {args.tokens} tokens, teacher-forced against "
          f"the fp32 full model's greedy continuation")
    print(f"{'precision':12} {'agreement':>9} {'min/prompt':>10} {'decode tok/s':>12} {'weights MB':>10}")
    for name, model in models.items():
        scores = [agreement(model, p, c) for p, c in zip(prompts, continuations)]
        speeds = []
        for p in prompts[:3]:
            model.generate(p, max_new_tokens=64, mode="full", ignore_eos=True)
            speeds.append(model.stats.tokens_per_s)
        size = sum(f.stat().st_size for f in (model.root / "segments").iterdir()) / 1e6
        print(f"{name:12} {statistics.mean(scores):9.3f} {min(scores):10.3f} {statistics.median(speeds):12.1f} "
              f"{size:10.0f}")


if __name__ == "__main__":
    main()
