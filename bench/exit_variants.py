"""Early-exit artifacts against a full-model artifact of the same weights, interleaved in one run.

For each artifact: decode tok/s at ε (median over prompts and rounds), its
ratio to the full artifact measured back to back, tokens leaving per exit,
held-out teacher-forced agreement with the full model's own continuation,
and the speedup `--exits auto` predicted (when the artifact has a placement
record). Usage:

    .venv/bin/python bench/exit_variants.py FULL.eec VARIANT.eec [VARIANT.eec ...] [--eps 0.9] [--genai DIR]

``--genai DIR`` adds onnxruntime-genai (a peer in the benchmark's
environment) on a model it built from the same weights, decoding the same
prompt ids, timed the same way (decode only, after the prompt).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from eec.calib.calibrate import read_prompt_lines
from eec.runtime import load
from eec.runtime.evaluate import teacher_forced


def genai_decode_speed(model, ids: list[int], n: int) -> float:
    import time

    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + n, min_length=len(ids) + n, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(ids)  # the prompt, and the first token's logits
    generator.generate_next_token()
    start = time.perf_counter()
    while not generator.is_done():
        generator.generate_next_token()
    return (n - 1) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("full", type=Path)
    parser.add_argument("variants", type=Path, nargs="+")
    parser.add_argument("--eps", type=float, default=0.9)
    parser.add_argument("--prompts", type=Path, default=Path(__file__).parent / "heldout_prompts.txt")
    parser.add_argument("--count", type=int, default=6)
    parser.add_argument("--tokens", type=int, default=128, help="new tokens a prompt (the code model's goal: 128)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--genai", type=Path, help="an onnxruntime-genai model folder built from the same weights")
    args = parser.parse_args()
    full = load(args.full)
    variants = {p.name: load(p) for p in args.variants}
    prompts = [full.encode(t) for t in read_prompt_lines(args.prompts)[: args.count]]
    full.generate(prompts[0], max_new_tokens=8, mode="full")
    for m in variants.values():
        m.generate(prompts[0], max_new_tokens=8, epsilon=args.eps)
    genai = None
    if args.genai:
        import onnxruntime_genai as og

        genai = og.Model(str(args.genai))
    speed = {name: [] for name in ["full", *variants, *(["genai"] if genai else [])]}
    ratio = {name: [] for name in variants}
    exits = {name: {} for name in variants}
    for _ in range(args.rounds):
        for ids in prompts:
            full.generate(ids, max_new_tokens=args.tokens, mode="full", ignore_eos=True)
            base = full.stats.tokens_per_s
            speed["full"].append(base)
            if genai is not None:
                speed["genai"].append(genai_decode_speed(genai, ids, args.tokens))
            for name, m in variants.items():
                m.generate(ids, max_new_tokens=args.tokens, epsilon=args.eps, ignore_eos=True)
                speed[name].append(m.stats.tokens_per_s)
                ratio[name].append(m.stats.tokens_per_s / base)
                for layer, n in m.stats.exits.items():
                    exits[name][layer] = exits[name].get(layer, 0) + n
    references = [full.generate(ids, max_new_tokens=args.tokens, mode="full", ignore_eos=True).tokens
                  for ids in prompts]  # as long as the timed generations (64 in earlier runs)
    print(f"{len(prompts)} held-out prompts x {args.tokens} tokens x {args.rounds} rounds, ε = {args.eps}; "
          f"full {statistics.median(speed['full']):.1f} tok/s decode")
    if genai is not None:
        print(f"onnxruntime-genai: {statistics.median(speed['genai']):.1f} tok/s decode")
    print(f"{'artifact':28} {'tok/s':>7} {'vs full':>8} {'predicted':>9} {'agreement':>9}  exits")
    for name, m in variants.items():
        thresholds, metric = m.resolve_thresholds("early-exit", epsilon=args.eps)
        hits = total = 0
        for ids, ref in zip(prompts, references):
            predicted, _ = teacher_forced(m, ids, ref, thresholds, metric)
            hits += sum(int(a == b) for a, b in zip(predicted, ref))
            total += len(ref)
        placement = m.manifest.placement or {}
        pred = f"{placement['predicted_speedup']:.2f}x" if "predicted_speedup" in placement else "-"
        vs_genai = f", {statistics.median(speed[name]) / statistics.median(speed['genai']):.2f}x genai" if genai else ""
        print(f"{name:28} {statistics.median(speed[name]):7.1f} {statistics.median(ratio[name]):7.2f}x {pred:>9} "
              f"{hits / total:9.3f}  {dict(sorted(exits[name].items()))}{vs_genai}")


if __name__ == "__main__":
    main()
