"""Exited rows riding the deeper rows' calls against deferring their positions to a catch-up of their own.

One process, one artifact, the same batch of prompts decoded alternately with riding
(`eec.runtime.core.Batch._riders`) and with it turned off (every exited position waits for its row's
next deep token, as before riding), ``--rounds`` times; the first round warms up and is dropped.
Tokens/s is all new tokens over the batch's wall time. Usage:

    .venv/bin/python bench/riding.py EXITS.eec --prompts P.txt [--batch 8] [--eps 0.9] [--tokens 128]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import eec.runtime.core as core
from eec.calib.calibrate import read_prompts
from eec.runtime import load


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--prompts", type=Path, required=True)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--eps", type=float, default=0.9)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()

    model = load(args.artifact)
    prompts = read_prompts(args.prompts, model.codec is not None)[: args.batch]
    riders = core.Batch._riders
    speed: dict[str, list[float]] = {"riding": [], "deferring": []}
    for r in range(args.rounds):
        for name in speed:
            core.Batch._riders = riders if name == "riding" else (lambda self, kv, slots, results: [])
            start = time.perf_counter()
            results = model.generate(prompts, max_new_tokens=args.tokens, epsilon=args.eps, max_batch=args.batch,
                                     ignore_eos=True)
            if r:
                speed[name].append(sum(len(x.tokens) for x in results) / (time.perf_counter() - start))
    core.Batch._riders = riders
    ride, defer = (statistics.median(speed[n]) for n in ("riding", "deferring"))
    print(f"batch {args.batch}, ε = {args.eps}, {args.tokens} new tokens a sequence, median of {args.rounds - 1} "
          f"rounds: riding {ride:.0f} tok/s, deferring {defer:.0f} tok/s, {ride / defer:.2f}x")


if __name__ == "__main__":
    main()
