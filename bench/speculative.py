"""Speculative mode against full and early-exit mode of one artifact, interleaved in one run.

Per setting: decode tok/s (median over prompts and rounds), the median of
per-run ratios to full mode decoded just before it, the share of drafts the
full model kept (speculative) or of checked exits it agrees with (early exit
with ``monitor``, whose cost this shows), and whether every token equals full
mode's (speculative is lossless; early exit is not, so its free-running match
is shown for scale).
Usage:

    .venv/bin/python bench/speculative.py ARTIFACT.eec [--eps 0.9,0.95] [--drafts 4,6,8] \\
        [--prompts FILE] [--count 6] [--tokens 128] [--rounds 2]
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from eec.calib.calibrate import read_prompt_lines
from eec.runtime import load


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--eps", default="0.9,0.95", help="accuracy levels: the draft threshold of speculative mode")
    parser.add_argument("--drafts", default="4,6,8", help="speculative mode's max_draft values")
    parser.add_argument("--prompts", type=Path, default=Path(__file__).parent / "heldout_prompts.txt")
    parser.add_argument("--count", type=int, default=6)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    model = load(args.artifact)
    prompts = [model.encode(t) for t in read_prompt_lines(args.prompts)[: args.count]]
    levels = [float(e) for e in args.eps.split(",")]
    drafts = [int(d) for d in args.drafts.split(",")]
    settings = {f"early exit ε={e}": dict(epsilon=e) for e in levels}
    settings.update({f"early exit ε={e} monitored": dict(epsilon=e, monitor=True) for e in levels})
    settings.update({f"speculative ε={e} draft {d}": dict(mode="speculative", epsilon=e, max_draft=d)
                     for e in levels for d in drafts})
    model.generate(prompts[0], max_new_tokens=8, mode="full")
    for kwargs in settings.values():
        model.generate(prompts[0], max_new_tokens=8, **kwargs)
    speed = {name: [] for name in ["full", *settings]}
    ratio = {name: [] for name in settings}
    same = {name: 0 for name in settings}
    kept = {name: [0, 0] for name in settings}
    for _ in range(args.rounds):
        for ids in prompts:
            reference = model.generate(ids, max_new_tokens=args.tokens, mode="full", ignore_eos=True)
            base = model.stats.tokens_per_s
            speed["full"].append(base)
            for name, kwargs in settings.items():
                got = model.generate(ids, max_new_tokens=args.tokens, ignore_eos=True, **kwargs)
                speed[name].append(model.stats.tokens_per_s)
                ratio[name].append(model.stats.tokens_per_s / base)
                same[name] += got.tokens == reference.tokens
                kept[name][0] += model.stats.accepted + model.stats.agreed
                kept[name][1] += model.stats.drafted + model.stats.checked
    runs = args.rounds * len(prompts)
    print(f"{args.artifact.name}: {len(prompts)} prompts x {args.tokens} tokens x {args.rounds} rounds, interleaved")
    print(f"{'setting':32} {'tok/s':>8} {'vs full':>8} {'kept/agreed':>11} {'= full':>8}")
    print(f"{'full':32} {statistics.median(speed['full']):8.0f} {1:8.2f}x")
    for name in settings:
        accepted, drafted = kept[name]
        share = f"{accepted / drafted:.3f}" if drafted else "-"
        print(f"{name:32} {statistics.median(speed[name]):8.0f} {statistics.median(ratio[name]):7.2f}x "
              f"{share:>11} {same[name]:>4}/{runs}")


if __name__ == "__main__":
    main()
