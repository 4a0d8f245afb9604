"""Drawing a token instead of taking the most likely one (numpy only).

Every head of an artifact compiled by this eec returns, beside its token, its
``SAMPLE_K`` (64) most likely tokens and their logits; a token is drawn from
those, after temperature, top-k and top-p, with the request's own random
generator, so a seed repeats a generation exactly, alone or in a batch. An
exiting token is drawn from its exit head's distribution, a token that goes
through every layer from the final head's. Tokens outside the 64 most likely
are never drawn: at temperature 1 they hold little mass on trained models,
and it is the truncation serving engines apply by default.

What ε means when sampling: calibration measures how often an exit's most
likely token is the full model's, and the thresholds keep that share at ε
among exited tokens. Sampling draws from the exit's distribution where the
full model's would have been used: at ε = 0.9 the two heads agree on their
top token for at least 90% of exited tokens (with probability 1 − δ under the
risk rule), not that the drawn tokens follow the full model's distribution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from eec.errors import InputError


@dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0
    top_k: int | None = None  # keep the k most likely (at most the heads' 64)
    top_p: float = 1.0  # keep the fewest most likely tokens whose probability reaches p
    seed: int | None = None

    @staticmethod
    def make(temperature=None, top_k=None, top_p=None, seed=None) -> "Sampling | None":
        """Checked options; None (greedy) when none is given, or at temperature 0 or top_k 1."""
        if temperature is None and top_k is None and top_p is None and seed is None:
            return None
        if temperature is not None and (isinstance(temperature, bool) or not isinstance(temperature, (int, float))
                                        or not math.isfinite(temperature) or temperature < 0):
            raise InputError(f"temperature must be a number of at least 0, got {temperature!r}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1):
            raise InputError(f"top_k must be a whole number of at least 1, got {top_k!r}")
        if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float))
                                  or not 0 < top_p <= 1):
            raise InputError(f"top_p must be in (0, 1], got {top_p!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0):
            raise InputError(f"seed must be a whole number of at least 0, got {seed!r}")
        sampling = Sampling(1.0 if temperature is None else float(temperature), None if top_k is None else int(top_k),
                            1.0 if top_p is None else float(top_p), None if seed is None else int(seed))
        return None if sampling.temperature == 0 or sampling.top_k == 1 else sampling

    def generator(self) -> np.random.Generator:
        return np.random.default_rng(self.seed)

    def draw(self, ids: np.ndarray, logits: np.ndarray, rng: np.random.Generator) -> int:
        """A token from the top ``ids`` and their ``logits`` (largest first)."""
        k = len(ids) if self.top_k is None else min(self.top_k, len(ids))
        z = logits[:k].astype(np.float64) / self.temperature
        p = np.exp(z - z[0])
        p /= p.sum()
        if self.top_p < 1:
            keep = int(np.searchsorted(np.cumsum(p), self.top_p)) + 1  # the fewest whose mass reaches top_p
            p = p[:keep] / p[:keep].sum()
        return int(ids[rng.choice(len(p), p=p)])
