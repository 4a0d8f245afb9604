"""Threshold rules: from calibration traces (confidence, agreed) to τ(ε). numpy only.

A trace holds, per token that reached an exit, the exit's confidence and
whether its token equals the final head's. A token exits when
``confidence >= τ``; ``τ = inf`` means the exit is never taken.

Rules:
1. `valade_threshold` (Valade, seed 002 §3.3.1): sort by confidence; τ is the
   smallest confidence value such that, among the tokens at or above it, the
   share that agree is at least ε. Candidate cuts are at the start of a run
   of equal confidences, so "at or above τ" is exactly the set the cut keeps.
2. `risk_controlled_threshold`: Learn-then-Test (Angelopoulos et al. 2021,
   arXiv:2110.01052) with fixed-sequence testing. Candidate thresholds are
   tested from the highest down; at each the null "agreement of the tokens at
   or above it is below ε" is rejected when the exact binomial p-value
   P(Binomial(n, ε) ≥ k), k agreeing out of n, is at most δ (the one-sided
   test behind the Clopper-Pearson bound); τ is the lowest threshold reached
   before the first failure (cuts that keep too few tokens to be certified
   even if all agreed are skipped). With i.i.d. tokens, the
   agreement of exited tokens on new data is at least ε with probability at
   least 1 - δ. (Tokens of one sequence are not independent: the guarantee is
   only as good as the calibration set's diversity.)
3. `cascade_thresholds`: exits are calibrated in the order a token meets
   them: τ_1 on all tokens, τ_2 on the tokens τ_1 keeps, and so on, since at
   run time exit k only sees the tokens earlier exits did not take. Each
   exit's taken tokens then agree at rate ≥ ε, so all exited tokens do too.
4. `joint_threshold`: one threshold λ for every exit (CALM's calibration, a
   single λ tested by Learn-then-Test), certified on the whole set at once:
   ε bounds the share of *all* samples whose answer is acceptable (those that
   run to the end are), not the share of each exit's takers. One test on n
   samples is much tighter than one per exit on the few hundred each exit
   sees, which is what ε near 1 on a set of a thousand needs; the price is
   that the exits share a scale (the metric's), not a threshold each.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import numpy as np

from eec.errors import InputError

Rule = Callable[[np.ndarray, np.ndarray, float], float]


def _check(confidence: np.ndarray, agreed: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray]:
    if not 0.0 <= eps <= 1.0:
        raise InputError(f"epsilon must be in [0, 1], got {eps}")
    c = np.asarray(confidence, dtype=np.float64).ravel()
    t = np.asarray(agreed, dtype=bool).ravel()
    if c.shape != t.shape:
        raise InputError("confidence and agreement traces differ in length")
    return c, t


def _cuts(c: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct confidence values (ascending) with, for each, how many tokens lie
    at or above it and how many of those agree."""
    order = np.argsort(c, kind="stable")
    c, t = c[order], t[order]
    starts = np.flatnonzero(np.r_[True, c[1:] != c[:-1]])  # first index of each run of equal values
    agree_suffix = np.cumsum(t[::-1])[::-1]  # agreeing tokens from index i to the end
    return c[starts], len(c) - starts, agree_suffix[starts]


def valade_threshold(confidence: np.ndarray, agreed: np.ndarray, eps: float) -> float:
    c, t = _check(confidence, agreed, eps)
    if c.size == 0:
        return float("inf")
    values, n, k = _cuts(c, t)
    ok = k >= eps * n  # share of agreeing tokens at or above each cut is at least eps
    return float(values[np.argmax(ok)]) if ok.any() else float("inf")


def binomial_p_value(k: np.ndarray, n: np.ndarray, eps: float) -> np.ndarray:
    """p-value of "agreement < eps" after k agreeing out of n: P(Binomial(n, eps) >= k), exactly."""
    k, n = np.asarray(k, dtype=np.int64), np.asarray(n, dtype=np.int64)
    if eps <= 0.0:
        return np.zeros(k.shape)
    log_fact = np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, int(n.max(initial=0)) + 1)))])
    out = np.empty(k.shape)
    for i, (ki, ni) in enumerate(zip(k.ravel(), n.ravel())):
        j = np.arange(ki, ni + 1)
        log_pmf = log_fact[ni] - log_fact[j] - log_fact[ni - j] + j * math.log(eps) + (ni - j) * math.log1p(-eps)
        out.flat[i] = float(np.exp(log_pmf).sum()) if j.size else 0.0
    return np.minimum(out, 1.0)


@functools.lru_cache(maxsize=64)
def _first_testable(eps: float, delta: float) -> int:
    """The fewest tokens at which agreeing (1 + eps) / 2 of them is certified at level delta."""
    if eps <= 0.0:
        return 1
    n = max(1, int(math.log(delta) / math.log(eps)))  # below this even all agreeing is not enough
    while binomial_p_value(np.array([math.ceil(n * (1 + eps) / 2)]), np.array([n]), eps)[0] > delta:
        n += 1
    return n


def risk_controlled_threshold(confidence: np.ndarray, agreed: np.ndarray, eps: float, delta: float = 0.1) -> float:
    if not 0.0 < delta < 1.0:
        raise InputError(f"delta must be in (0, 1), got {delta}")
    c, t = _check(confidence, agreed, eps)
    if c.size == 0:
        return float("inf")
    values, n, k = _cuts(c, t)
    if eps >= 1.0:
        return float("inf")
    # The fixed sequence starts at the first cut that keeps enough tokens to be
    # certified at an agreement halfway between eps and 1; cuts above it are left
    # out rather than allowed to end the sequence. Starting where all tokens must
    # agree (n >= log delta / log eps) let one disagreeing token among the top 22
    # stop it: on uniform confidences (eps 0.9, delta 0.1, 2000 tokens) 13% of
    # calibrations returned inf, against 7% from this start, with the same share
    # of runs under eps (8%, at most delta). Which cuts are left out depends on
    # n alone, never on the agreement being tested, so the guarantee stands.
    testable = n >= _first_testable(eps, delta)
    values, n, k = values[testable], n[testable], k[testable]
    rejected = binomial_p_value(k, n, eps)[::-1] <= delta  # from the highest threshold down
    passed = int(np.argmin(rejected)) if not rejected.all() else len(rejected)
    return float(values[::-1][passed - 1]) if passed else float("inf")


def cascade_thresholds(confidence: np.ndarray, agreed: np.ndarray, eps: float, rule: Rule = valade_threshold) -> list[float]:
    """τ for each exit, in order; ``confidence`` and ``agreed`` are [tokens, exits]."""
    c = np.asarray(confidence, dtype=np.float64)
    t = np.asarray(agreed, dtype=bool)
    if c.ndim != 2 or c.shape != t.shape:
        raise InputError("cascade traces must be [tokens, exits] arrays of the same shape")
    remaining = np.ones(c.shape[0], dtype=bool)
    taus = []
    for k in range(c.shape[1]):
        tau = rule(c[remaining, k], t[remaining, k], eps)
        taus.append(tau)
        remaining &= ~(c[:, k] >= tau)
    return taus


def joint_threshold(confidence: np.ndarray, acceptable: np.ndarray, eps: float, delta: float = 0.1) -> float:
    """One threshold for every exit from ``confidence`` and ``acceptable`` ``[samples, exits]``: a sample leaves
    at the first exit whose confidence is at least λ (NaN never) with that exit's answer, or runs to the end,
    which is acceptable. Fixed-sequence testing from the highest candidate down: at each the null "the share of
    samples whose answer is acceptable is below ε" is rejected when P(Binomial(n, ε) ≥ k), k acceptable of n,
    is at most δ; λ is the lowest candidate reached before the first failure (inf: none)."""
    if not 0.0 < delta < 1.0:
        raise InputError(f"delta must be in (0, 1), got {delta}")
    if not 0.0 <= eps <= 1.0:
        raise InputError(f"epsilon must be in [0, 1], got {eps}")
    c = np.asarray(confidence, dtype=np.float64)
    ok = np.asarray(acceptable, dtype=bool)
    if c.ndim != 2 or c.shape != ok.shape:
        raise InputError("joint traces must be [samples, exits] arrays of the same shape")
    n = c.shape[0]
    candidates = np.unique(c[np.isfinite(c)])[::-1]
    if n == 0 or eps >= 1.0 or candidates.size == 0:
        return float("inf")
    # n is the same at every candidate, so the test is one count: the fewest acceptable samples whose p-value
    # is at most delta (the tail falls as k grows: a bisection), found once
    lo, hi = 0, n + 1  # hi: even all n acceptable may not be enough
    while lo < hi:
        mid = (lo + hi) // 2
        if binomial_p_value(np.array([mid]), np.array([n]), eps)[0] <= delta:
            hi = mid
        else:
            lo = mid + 1
    allowed = n - lo  # unacceptable samples a candidate may have; negative: none can be certified
    rows = np.arange(n)
    passed = float("inf")
    for lam in candidates:
        leaves = c >= lam  # NaN compares false: never leaves on an undefined score
        if int((leaves.any(1) & ~ok[rows, leaves.argmax(1)]).sum()) > allowed:
            break
        passed = float(lam)
    return passed
