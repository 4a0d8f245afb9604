"""Teacher-forced comparison of a model against reference token sequences (numpy only).

A reference continuation (usually the fp32 full model's own greedy output)
is fed one token at a time; at each position the model predicts the next
token, and agreement is the share of positions where that prediction equals
the reference's next token. Unlike comparing two free-running generations,
one early disagreement does not derail everything after it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from eec.runtime.model import EarlyExitModel


def teacher_forced(model: EarlyExitModel, prompt: Sequence[int], reference: Sequence[int],
                   thresholds: dict[int, float] | None = None, metric: int = 0) -> tuple[list[int], list[int]]:
    """The model's prediction and exit layer at each of ``len(reference)`` positions after ``prompt``.

    The prompt runs every layer (as in generation); each later position is
    judged with ``thresholds`` (None: full mode).
    """
    decoder = model.new_decoder(early_exit=thresholds is not None)
    feed, step_thresholds = np.asarray([list(prompt)], dtype=np.int64), None
    predictions, layers = [], []
    for token in reference:
        result = decoder.step(feed, step_thresholds, metric)
        predictions.append(result.token)
        layers.append(result.exit_layer)
        feed, step_thresholds = np.asarray([[int(token)]], dtype=np.int64), thresholds
    return predictions, layers


def agreement(model: EarlyExitModel, prompt: Sequence[int], reference: Sequence[int],
              thresholds: dict[int, float] | None = None, metric: int = 0) -> float:
    predictions, _ = teacher_forced(model, prompt, reference, thresholds, metric)
    return float(np.mean(np.asarray(predictions) == np.asarray(reference))) if len(reference) else 1.0
