"""Calibration traces and the thresholds they give; numpy only.

A trace row is one generated token: for each exit, every metric's score and
whether the exit's token equalled the final head's. The artifact keeps the
traces themselves (``calibration.npz``), so τ_k(ε) is computed at load time
for any ε, rule and metric.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from eec.calib.metrics import ALL_METRICS
from eec.calib.thresholds import cascade_thresholds, risk_controlled_threshold, valade_threshold
from eec.errors import ArtifactError, InputError

RULES = ("risk", "valade")


@dataclass
class Traces:
    exits: list[int]  # exit layers, the columns
    scores: np.ndarray  # [tokens, exits, len(ALL_METRICS)] float32; NaN where a metric is undefined
    agreed: np.ndarray  # [tokens, exits] bool: exit token == final token
    sequence: np.ndarray  # [tokens] int: the calibration prompt each token came from
    # Optional (absent in artifacts from eec 0.1): what compile-time searches rescore exits from.
    hidden: np.ndarray | None = None  # [tokens, exits, hidden] float16: each exit's last-position hidden state
    final: np.ndarray | None = None  # [tokens] int: the final head's token

    def __len__(self) -> int:
        return self.scores.shape[0]

    def save(self, path: Path) -> None:
        with open(path, "wb") as f:
            extra = {} if self.hidden is None else {"hidden": self.hidden.astype(np.float16), "final": self.final}
            np.savez(f, exits=np.asarray(self.exits, dtype=np.int64), scores=self.scores.astype(np.float32),
                     agreed=self.agreed, sequence=self.sequence, metrics=np.asarray(ALL_METRICS), **extra)

    @staticmethod
    def load(path: Path) -> "Traces":
        try:
            with np.load(path, allow_pickle=False) as z:
                stored = tuple(z["metrics"].tolist())
                if stored != ALL_METRICS[: len(stored)]:
                    raise ArtifactError(f"{path}: traces hold metrics {list(stored)}; recalibrate")
                scores = z["scores"]
                if len(stored) < len(ALL_METRICS):  # metrics added since: undefined (NaN) in older traces
                    pad = np.full((*scores.shape[:2], len(ALL_METRICS) - len(stored)), np.nan, dtype=scores.dtype)
                    scores = np.concatenate([scores, pad], axis=-1)
                hidden = z["hidden"] if "hidden" in z.files else None
                final = z["final"] if "final" in z.files else None
                return Traces(z["exits"].tolist(), scores, z["agreed"].astype(bool), z["sequence"], hidden, final)
        except (OSError, KeyError, ValueError) as e:
            raise ArtifactError(f"{path} is not a readable calibration file ({e})") from None

    def subset(self, rows: np.ndarray) -> "Traces":
        pick = (lambda a: None if a is None else a[rows])
        return Traces(self.exits, self.scores[rows], self.agreed[rows], self.sequence[rows], pick(self.hidden),
                      pick(self.final))

    def columns(self, exits: list[int]) -> "Traces":
        """The traces of some exits only, in the order given."""
        cols = [self.exits.index(e) for e in exits]
        hidden = None if self.hidden is None else self.hidden[:, cols]
        return Traces(list(exits), self.scores[:, cols], self.agreed[:, cols], self.sequence, hidden, self.final)


def metric_index(metric: str) -> int:
    try:
        return ALL_METRICS.index(metric)
    except ValueError:
        raise InputError(f"unknown metric {metric!r}; choose from {', '.join(ALL_METRICS)}") from None


def thresholds_for(traces: Traces, eps: float, metric: str, rule: str = "risk", delta: float = 0.1) -> dict[int, float]:
    """τ per exit at accuracy level ε, calibrated in cascade order."""
    if rule not in RULES:
        raise InputError(f"unknown threshold rule {rule!r}; choose from {', '.join(RULES)}")
    column = traces.scores[:, :, metric_index(metric)]

    def fit(c, t, e):
        # NaN (cosine at the first exit) is left out of the fit; it compares False, so it never exits.
        c, t = c[~np.isnan(c)], t[~np.isnan(c)]
        return risk_controlled_threshold(c, t, e, delta) if rule == "risk" else valade_threshold(c, t, e)

    return dict(zip(traces.exits, cascade_thresholds(column, traces.agreed, eps, fit)))


@dataclass
class Simulation:
    exit_rate: float  # share of tokens that leave early
    mean_depth: float  # mean layers run per token
    agreement: float  # share of tokens whose token equals the final head's
    exits: dict[int, int]  # layer -> tokens leaving there


def exit_layers(traces: Traces, thresholds: dict[int, float], metric: str, num_layers: int) -> np.ndarray:
    """Each traced token's exit layer under ``thresholds`` (``num_layers``: it ran every layer)."""
    column = traces.scores[:, :, metric_index(metric)]
    layers = np.full(len(traces), num_layers, dtype=np.int64)
    remaining = np.ones(len(traces), dtype=bool)
    for k, layer in enumerate(traces.exits):
        take = remaining & (column[:, k] >= thresholds[layer])  # NaN compares False
        layers[take] = layer
        remaining &= ~take
    return layers


def simulate(traces: Traces, thresholds: dict[int, float], metric: str, num_layers: int) -> Simulation:
    """Replay the exit decisions on the traces (teacher-forced: each row is the full model's prefix)."""
    n = len(traces)
    layers = exit_layers(traces, thresholds, metric, num_layers)
    agree = np.ones(n, dtype=bool)
    counts = {}
    for k, layer in enumerate(traces.exits):
        take = layers == layer
        agree[take] = traces.agreed[take, k]
        counts[layer] = int(take.sum())
    counts[num_layers] = int((layers == num_layers).sum())
    return Simulation(float(np.mean(layers < num_layers)) if n else 0.0, float(layers.mean()) if n else float(num_layers),
                      float(agree.mean()) if n else 1.0, counts)


def choose_metric(traces: Traces, num_layers: int, eps: float = 0.9, rule: str = "risk") -> str:
    """The metric with the smallest mean depth at ε on the traces."""
    return min(ALL_METRICS, key=lambda m: simulate(traces, thresholds_for(traces, eps, m, rule), m, num_layers).mean_depth)
