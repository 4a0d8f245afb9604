"""Where a decode step's time goes: onnxruntime's calls against eec's host work around them.

Runs a batch of prompts through one `eec.runtime.engine.Engine` and times, for every step after the
prefill, the interval between two steps of the batch (`Batch.step`, or the mode's own: `Batch.full`
where every row is in full mode, `Batch.early` for early exit scored by the heads) and every
`run_with_iobinding` inside one (`time.perf_counter`); the host time is the step less its calls, and its parts: before the first call of a step, after the last one
inside the step, and between steps (`Engine`). Medians of ``--rounds`` runs. Usage:

    .venv/bin/python bench/step_host.py ARTIFACT.eec --prompts P.txt [--batch 8] [--mode full|early-exit]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import onnxruntime as ort

import eec.runtime.core as core
from eec.calib.calibrate import read_prompts
from eec.runtime import load
from eec.runtime.engine import Engine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--prompts", type=Path, required=True)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--mode", default="full", choices=["full", "early-exit"])
    parser.add_argument("--eps", type=float, default=0.9)
    parser.add_argument("--prompt-tokens", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    model = load(args.artifact, threads=args.threads)
    lines = read_prompts(args.prompts, model.codec is not None)
    prompts = [model.encode(line, chat=False)[: args.prompt_tokens] for line in lines]
    options = dict(mode="full") if args.mode == "full" else dict(epsilon=args.eps)

    marks: list[tuple[str, float]] = []
    run = ort.InferenceSession.run_with_iobinding

    def timed_run(self, *a, **k):
        marks.append(("call", time.perf_counter()))
        out = run(self, *a, **k)
        marks.append(("return", time.perf_counter()))
        return out

    def timed(strategy):
        def step(self, *a, **k):
            marks.append(("step", time.perf_counter()))
            out = strategy(self, *a, **k)
            marks.append(("end", time.perf_counter()))
            return out
        return step

    ort.InferenceSession.run_with_iobinding = timed_run
    for name in ("step", "full", "early"):  # each mode's step: the general one, full mode's, early exit's
        setattr(core.Batch, name, timed(getattr(core.Batch, name)))
    steps, calls, graph = [], [], []
    parts: dict[str, list[float]] = {"before the call": [], "after it, in the step": [], "between steps": []}
    for _ in range(args.rounds):
        engine = Engine(model, max_batch=args.batch, early_exit=args.mode != "full")
        for i in range(args.batch):
            engine.submit(prompts[i % len(prompts)], max_new_tokens=args.tokens + 1, ignore_eos=True, **options)
        engine.step()  # the prefill
        marks.clear()
        while engine.busy:
            engine.step()
        starts = [t for kind, t in marks if kind == "step"]
        spans = [b - a for (k1, a), (k2, b) in zip(marks, marks[1:]) if (k1, k2) == ("call", "return")]
        n = len(starts) - 1
        steps.append((starts[-1] - starts[0]) / n)
        for (k1, a), (k2, b) in zip(marks, marks[1:]):  # the host time's parts, one-call steps only
            name = {("step", "call"): "before the call", ("return", "end"): "after it, in the step",
                    ("end", "step"): "between steps"}.get((k1, k2))
            if name:
                parts[name].append(b - a)
        calls.append(len(spans) / len(starts))
        graph.append(sum(spans) / len(starts))
    step_s, graph_s = statistics.median(steps), statistics.median(graph)
    print(f"{args.artifact.name} {args.mode} batch {args.batch}: step {step_s * 1e6:.0f} µs, onnxruntime "
          f"{graph_s * 1e6:.0f} µs in {statistics.median(calls):.2f} calls, host {(step_s - graph_s) * 1e6:.0f} µs ("
          + ", ".join(f"{name} {statistics.median(v) * 1e6:.0f} µs" for name, v in parts.items() if v) + ", medians)")


if __name__ == "__main__":
    main()
