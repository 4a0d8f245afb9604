"""Aggregate decode throughput at several batch sizes: eec full, eec early exit at ε, onnxruntime-genai.

Each peer runs in its own worker process (eec's onnxruntime thread pool is
process-wide, and genai brings its own onnxruntime); peers alternate round by
round, each round starting with the next peer (so that no peer always runs
right after the same other), and each figure is the median of the rounds. The
same artifact given as both eec peers measures how far apart two identical
peers come out on the machine: 3-6% on the 2-core machine these figures come
from, more than some of the gaps measured. A batch of B takes the
first B prompts (cycling through the file), each cut to the same number of
tokens (``--prompt-tokens``), so every peer sees the same batch without
padding rules of its own; every sequence generates ``--tokens`` new tokens
(end of sequence ignored). Throughput is all new tokens over the wall time of
the batch, prefill included (the prompts are short).

onnxruntime-genai is a peer, not a dependency: give ``--genai DIR`` (a model
folder built from the same weights with its builder) and ``--genai-path``,
a folder holding the onnxruntime_genai package (``pip install --target``).
Usage:

    .venv/bin/python bench/batch.py FULL.eec EXITS.eec --eps 0.9 --prompts P.txt [--genai DIR --genai-path PKG]

Agreement: the early-exit artifact's held-out teacher-forced agreement with
the full artifact's greedy tokens at ε, on the same prompts (one sequence each).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

WORKER = r"""
import json, sys, time
import numpy as np
kind, path, eps, tokens, batches, prompts = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4]), json.loads(sys.argv[5]), json.loads(sys.argv[6])
threads = int(sys.argv[7])
out = {}
if kind.startswith("eec"):
    from eec.runtime import load
    model = load(path, threads=threads)
    kwargs = {"mode": "full"} if kind == "eec-full" else {"epsilon": eps}
    model.generate(prompts[:2], max_new_tokens=8, ignore_eos=True, **kwargs)
    for b in batches:
        batch = [prompts[i % len(prompts)] for i in range(b)]
        start = time.perf_counter()
        results = model.generate(batch, max_new_tokens=tokens, ignore_eos=True, max_batch=b, **kwargs)
        elapsed = time.perf_counter() - start
        exits = {}
        for r in results:
            for k, v in r.stats.exits.items():
                exits[k] = exits.get(k, 0) + v
        out[b] = (sum(len(r.tokens) for r in results) / elapsed, exits)
else:
    import onnxruntime_genai as og
    config = og.Config(path)  # the same thread count as eec's: genai's own default ran at about half its speed here
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
    model = og.Model(config)
    for b in [1] + list(batches):
        batch = np.asarray([prompts[i % len(prompts)] for i in range(b)], dtype=np.int32)
        params = og.GeneratorParams(model)
        length = batch.shape[1] + tokens
        params.set_search_options(max_length=length, min_length=length, do_sample=False, batch_size=b)
        start = time.perf_counter()
        generator = og.Generator(model, params)
        generator.append_tokens(batch)
        while not generator.is_done():
            generator.generate_next_token()
        elapsed = time.perf_counter() - start
        new = generator.get_sequence(0).shape[0] - batch.shape[1]
        out[b] = (b * new / elapsed, {})
print(json.dumps(out))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("full", type=Path)
    parser.add_argument("exits", type=Path)
    parser.add_argument("--eps", type=float, default=0.9)
    parser.add_argument("--prompts", type=Path, required=True)
    parser.add_argument("--prompt-tokens", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--batches", default="1,4,8,16")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--genai", type=Path)
    parser.add_argument("--genai-path", type=Path, help="folder holding the onnxruntime_genai package")
    parser.add_argument("--agreement-prompts", type=int, default=13)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="onnxruntime threads, every peer")
    args = parser.parse_args()

    from eec.calib.calibrate import read_prompts
    from eec.runtime import load
    from eec.runtime.evaluate import teacher_forced

    full = load(args.full)
    lines = read_prompts(args.prompts, full.codec is not None)  # token ids for an artifact without a tokenizer
    encoded = [full.encode(line, chat=False) for line in lines]
    short = [ids for ids in encoded if len(ids) >= args.prompt_tokens]
    if not short:
        raise SystemExit(f"no prompt has {args.prompt_tokens} tokens")
    prompts = [ids[: args.prompt_tokens] for ids in short]
    batches = [int(b) for b in args.batches.split(",")]

    peers = {"eec-full": args.full, "eec-exit": args.exits}
    if args.genai:
        peers["genai"] = args.genai
    speed = {p: {b: [] for b in batches} for p in peers}
    exits: dict[int, dict] = {}
    names = list(peers)
    for r in range(args.rounds):
        for peer in names[r % len(names):] + names[: r % len(names)]:  # each peer first in turn
            path = peers[peer]
            env = dict(os.environ)
            if peer == "genai" and args.genai_path:
                env["PYTHONPATH"] = str(args.genai_path)
            done = subprocess.run([sys.executable, "-c", WORKER, peer, str(path), str(args.eps), str(args.tokens),
                                   json.dumps(batches), json.dumps(prompts), str(args.threads)],
                                  capture_output=True, text=True, env=env)
            if done.returncode:
                raise SystemExit(f"{peer} failed:\n{done.stderr[-2000:]}")
            for b, (tps, ex) in json.loads(done.stdout.strip().splitlines()[-1]).items():
                if int(b) in speed[peer]:
                    speed[peer][int(b)].append(tps)
                if peer == "eec-exit":
                    exits[int(b)] = ex
        print(f"round {r + 1} done", file=sys.stderr, flush=True)

    # Held-out agreement: the exit artifact's teacher-forced predictions against full mode's greedy tokens.
    exit_model = load(args.exits)
    thresholds, metric = exit_model.resolve_thresholds("early-exit", epsilon=args.eps)
    hits = total = 0
    for ids in encoded[: args.agreement_prompts]:
        reference = full.generate(ids, mode="full", max_new_tokens=args.tokens, ignore_eos=True).tokens
        predicted, _ = teacher_forced(exit_model, ids, reference, thresholds, metric)
        hits += sum(int(a == b) for a, b in zip(predicted, reference))
        total += len(reference)

    med = {p: {b: statistics.median(v) for b, v in s.items()} for p, s in speed.items()}
    print(f"aggregate tok/s (median of {args.rounds} rounds, {args.tokens} new tokens a sequence, "
          f"{args.prompt_tokens}-token prompts); early exit at ε = {args.eps}, held-out agreement {hits / total:.3f}")
    header = f"{'batch':>5}  {'eec full':>9}  {'eec exit':>9}  {'exit/full':>9}"
    if "genai" in med:
        header += f"  {'genai':>9}  {'exit/genai':>10}  {'full/genai':>10}"
    print(header)
    for b in batches:
        row = f"{b:>5}  {med['eec-full'][b]:9.0f}  {med['eec-exit'][b]:9.0f}  {med['eec-exit'][b] / med['eec-full'][b]:8.2f}x"
        if "genai" in med:
            row += (f"  {med['genai'][b]:9.0f}  {med['eec-exit'][b] / med['genai'][b]:9.2f}x"
                    f"  {med['eec-full'][b] / med['genai'][b]:9.2f}x")
        print(row + f"  exits {dict(sorted((int(k), v) for k, v in exits.get(b, {}).items()))}")


if __name__ == "__main__":
    main()
