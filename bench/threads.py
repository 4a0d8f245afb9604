"""Decode speed by onnxruntime thread count, on a quiet machine and with one core taken by another process.

eec's thread count is process-wide (one global onnxruntime pool), so every
setting runs in its own worker process; settings alternate round by round.
``--busy`` starts a process that keeps one core busy (a pure-Python loop)
for the loaded half of the run: what an application doing its own work, or
a neighbour on a shared machine, does to a pool that wants every core.
``--genai DIR`` times onnxruntime-genai (a peer in the benchmark's
environment) on the same prompt ids (eec's encoding, chat template included)
with the same thread counts. Usage:

    .venv/bin/python bench/threads.py ARTIFACT.eec [--mode full|early-exit] [--threads 1,2] [--genai DIR]

Prints decode tok/s (median over prompts and rounds) for each setting,
quiet and loaded, and each setting's ratio to the first.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

WORKER = r"""
import json, sys, time
kind, path, threads, mode, eps, tokens, prompts = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], float(sys.argv[5]), int(sys.argv[6]), json.loads(sys.argv[7])
speeds = []
if kind == "eec":
    from eec.runtime import load
    model = load(path, threads=threads)
    kwargs = {"mode": "full"} if mode == "full" else {"epsilon": eps}
    model.generate(prompts[0], max_new_tokens=8, ignore_eos=True, **kwargs)
    for p in prompts:
        model.generate(p, max_new_tokens=tokens, ignore_eos=True, **kwargs)
        speeds.append(model.stats.tokens_per_s)
else:
    import onnxruntime_genai as og
    config = og.Config(path)
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
    model = og.Model(config)
    for ids in prompts:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + tokens, min_length=len(ids) + tokens, do_sample=False)
        gen = og.Generator(model, params)
        gen.append_tokens(ids)
        gen.generate_next_token()
        start = time.perf_counter()
        while not gen.is_done():
            gen.generate_next_token()
        speeds.append((tokens - 1) / (time.perf_counter() - start))
print(json.dumps(speeds))
"""

BUSY = "while True: pass"


def run(kind: str, path: Path, threads: int, args, prompts: list[list[int]]) -> list[float]:
    out = subprocess.run([sys.executable, "-c", WORKER, kind, str(path), str(threads), args.mode, str(args.eps),
                          str(args.tokens), json.dumps(prompts)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--mode", default="full", choices=["full", "early-exit"])
    parser.add_argument("--eps", type=float, default=0.9)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--prompts", type=Path, default=Path(__file__).parent / "heldout_prompts.txt")
    parser.add_argument("--count", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=128, help="new tokens a prompt (the code model's goal: 128)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--genai", type=Path, help="an onnxruntime-genai model folder built from the same weights")
    parser.add_argument("--no-busy", dest="busy", action="store_false", help="the quiet half only")
    args = parser.parse_args()
    from eec.runtime import load

    texts = [line.strip() for line in args.prompts.read_text().splitlines() if line.strip()][: args.count]
    encoder = load(args.artifact)  # for its tokenizer only: every timed run is in a worker process
    prompts = [encoder.encode(t) for t in texts]
    counts = [int(t) for t in args.threads.split(",")]
    settings = [("eec", args.artifact, t) for t in counts]
    settings += [("genai", args.genai, t) for t in counts] if args.genai else []
    speeds = {(k, t, state): [] for k, _, t in settings for state in ("quiet", "busy")}
    for state in ("quiet", "busy") if args.busy else ("quiet",):
        hog = subprocess.Popen([sys.executable, "-c", BUSY]) if state == "busy" else None
        try:
            for _ in range(args.rounds):
                for kind, path, t in settings:
                    speeds[(kind, t, state)] += run(kind, path, t, args, prompts)
        finally:
            if hog is not None:
                hog.kill()
    print(f"{args.artifact.name} ({args.mode}), {len(prompts)} prompts x {args.tokens} tokens x {args.rounds} rounds")
    print(f"{'runtime':8} {'threads':>7} {'quiet tok/s':>12} {'one core busy':>14} {'busy/quiet':>10}")
    base = None
    for kind, _, t in settings:
        quiet = statistics.median(speeds[(kind, t, "quiet")])
        busy = statistics.median(speeds[(kind, t, "busy")]) if args.busy else float("nan")
        base = base or quiet
        print(f"{kind:8} {t:7d} {quiet:12.1f} {busy:14.1f} {busy / quiet:10.2f}   ({quiet / base:.2f}x the first, quiet)")


if __name__ == "__main__":
    main()
