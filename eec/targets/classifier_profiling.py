"""`eec profile` for classifier artifacts: samples/s, speedup, agreement and accuracy per ε, on this device.

For each batch size, full mode and early exit at every ε pass over the same
inputs ``rounds`` times, interleaved (so that a slow spell of the machine
falls on all of them), and the median pass is reported. Agreement is with
full mode's labels on the same inputs; accuracy with the labels, where given.
The ideal speedup is what the exits would give with no cost but the
segments': each segment's call timed alone at batch 1, summed over the
segments each sample ran, against every segment for every sample.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np

from eec.runtime.classifier import EarlyExitClassifier
from eec.runtime.classifier_manifest import HIDDEN, INPUT, PROBS


@dataclass
class ClassifierRow:
    mode: str  # "full" or "early-exit"
    epsilon: float | None
    samples_per_s: dict[int, float]  # batch size -> samples/s (median pass)
    speedup: float  # over full mode at the first batch size
    speedups: dict[int, float]  # batch size -> speedup over full mode
    ideal_speedup: float
    agreement: float  # share of labels equal to full mode's
    accuracy: float | None  # share of labels equal to the given labels
    exits: dict[int, int] = field(default_factory=dict)  # stage -> samples that left after it

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def realised_over_ideal(self) -> float:
        return self.speedup / self.ideal_speedup if self.ideal_speedup else 0.0


def measure(sessions: list, x, heads: bool = True, rounds: int = 50, inputs: list[list[str]] | None = None,
            side: dict | None = None) -> list[float]:
    """Median seconds of each segment's call at batch 1 on the first input: with ``heads``, one session a
    segment (its with-head graph, the last one's plain graph); else the plain graphs (returning ``hidden``) of
    every segment but the last. ``inputs``: each segment's input names (default ``x``); ``side``: the other
    inputs of one sample (a text classifier's mask), for which ``x`` is that sample's token ids."""
    inputs = inputs or [[INPUT]] * len(sessions)
    side = side or {}
    times, main = [], x[:1]
    for k, session in enumerate(sessions):
        outputs = [HIDDEN] if not heads else [PROBS] if k == len(sessions) - 1 else [HIDDEN, PROBS]
        feeds = {name: main if j == 0 else side[name] for j, name in enumerate(inputs[k])}
        samples = []
        for _ in range(rounds + 5):  # the first calls allocate
            t = time.perf_counter()
            result = session.run(outputs, feeds)
            samples.append(time.perf_counter() - t)
        times.append(float(np.median(samples[5:])))
        main = result[0]
    return times


def segment_seconds(model: EarlyExitClassifier, x, rounds: int = 30) -> list[float]:
    """Median seconds of each segment's early-exit call at batch 1 on the first input (or text)."""
    sessions, inputs = model.batch_one_graphs()
    if model.text is not None:
        (_, ids, side), = model.text.batches(list(x[:1]), 1)[0]
        return measure(sessions, ids, rounds=rounds, inputs=inputs, side=side)
    return measure(sessions, x, rounds=rounds, inputs=inputs)


def profile_classifier(model: EarlyExitClassifier, x: np.ndarray, y: np.ndarray | None, levels: list[float],
                       batches: list[int], rounds: int, metric: str | None = None, progress=None,
                       criterion: str | None = None) -> list[ClassifierRow]:
    if model.text is None:
        x = model.check_input(x)
    configs = [("full", None)] + [("early-exit", e) for e in levels]
    options = [{"mode": "full"} if mode == "full" else {"epsilon": eps, "metric": metric, "criterion": criterion}
               for mode, eps in configs]
    results = [model.classify(x, **o) for o in options]  # also refuses a bad ε or metric before any timing
    rates = {b: [[] for _ in configs] for b in batches}
    steps, done = rounds * len(batches) * len(configs), 0
    for _ in range(rounds):
        for b in batches:
            for i, o in enumerate(options):
                if progress:
                    progress("timing", done, steps)
                start = time.perf_counter()
                for j in range(0, len(x), b):
                    model.classify(x[j:j + b], batch_size=b, **o)
                rates[b][i].append(len(x) / (time.perf_counter() - start))
                done += 1
    seconds = np.array(segment_seconds(model, x))
    stops = {seg.exit: k for k, seg in enumerate(model.manifest.segments)}
    full_labels = results[0].labels
    median = {b: [float(np.median(r)) for r in rates[b]] for b in batches}
    rows = []
    for i, ((mode, eps), result) in enumerate(zip(configs, results)):
        ran = np.array([stops[int(e)] for e in result.exits])
        ideal = float(seconds.sum() / np.cumsum(seconds)[ran].mean())
        speedups = {b: median[b][i] / median[b][0] for b in batches}
        rows.append(ClassifierRow(
            mode=mode, epsilon=eps, samples_per_s={b: median[b][i] for b in batches}, speedup=speedups[batches[0]],
            speedups=speedups, ideal_speedup=ideal if mode != "full" else 1.0,
            agreement=float((result.labels == full_labels).mean()),
            accuracy=None if y is None else float((result.labels == y).mean()),
            exits={int(k): int(v) for k, v in zip(*np.unique(result.exits, return_counts=True))},
        ))
    return rows
