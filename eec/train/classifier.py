"""Exit classifiers: trained on calibration traces, written inside the segments' graphs.

Each exit gets a small MLP (`eec.compiler.modules.ExitClassifier`) from its
hidden state to the probability that its head's token equals the final
head's, the label traces hold. The compiler trains it on traces of eec's
training prompts, not the calibration ones, so the thresholds calibrated
afterwards keep ε's meaning (`eec.compiler.pipeline.classifier_traces`).
Full-batch Adam with binary cross-entropy, weighted so both labels count
equally: agreement is rare at early exits. With ~900 tokens it overfit on
SmolLM2 (docs/benchmarks.md); ~5k tokens of its own prompts did much better.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F

from eec.calib.metrics import CLASSIFIER
from eec.calib.traces import Traces
from eec.compiler.modules import ExitClassifier


def train_classifiers(traces: Traces, rows: np.ndarray | None = None, epochs: int = 300, lr: float = 3e-3,
                      width: int = 64, seed: int = 0) -> dict[int, ExitClassifier]:
    if traces.hidden is None:
        raise ValueError("these traces keep no hidden states; recalibrate with this eec")
    rows = np.ones(len(traces), dtype=bool) if rows is None else rows
    out = {}
    for k, layer in enumerate(traces.exits):
        torch.manual_seed(seed + layer)
        x = torch.from_numpy(traces.hidden[rows, k].astype(np.float32))
        y = torch.from_numpy(traces.agreed[rows, k].astype(np.float32))
        positive = float(y.mean()) if len(y) else 0.0
        weight = torch.where(y > 0, 0.5 / max(positive, 1e-3), 0.5 / max(1 - positive, 1e-3))
        model = ExitClassifier(x.shape[1], width)
        opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-4)
        for _ in range(epochs):
            opt.zero_grad()
            loss = F.binary_cross_entropy_with_logits(model.logit(x), y, weight=weight)
            loss.backward()
            opt.step()
        for param in model.parameters():
            param.requires_grad_(False)
        out[layer] = model.eval()
    return out


def with_classifier_scores(traces: Traces, classifiers: dict[int, ExitClassifier]) -> Traces:
    """The traces with the ``classifier`` metric filled in from ``classifiers`` (PyTorch, on the stored hidden states)."""
    scores = traces.scores.copy()
    with torch.no_grad():
        for k, layer in enumerate(traces.exits):
            hidden = torch.from_numpy(traces.hidden[:, k].astype(np.float32))
            scores[:, k, CLASSIFIER] = classifiers[layer](hidden).numpy()
    return Traces(traces.exits, scores, traces.agreed, traces.sequence, traces.hidden, traces.final)
