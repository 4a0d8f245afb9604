"""Threshold rules against hand-computed cases, brute force and a known synthetic relation."""

import math

import numpy as np
import pytest

from eec.calib.thresholds import cascade_thresholds, joint_threshold, risk_controlled_threshold, valade_threshold
from eec.errors import InputError

INF = math.inf


@pytest.mark.parametrize("c, t, eps, want", [
    ([0.3, 0.1, 0.2], [1, 1, 1], 0.9, 0.1),  # all agree: every token may exit
    ([0.3, 0.1, 0.2], [0, 0, 0], 0.5, INF),  # none agree: never exit
    ([0.3, 0.1, 0.2], [0, 0, 0], 0.0, 0.1),  # eps = 0: everything exits
    ([0.1, 0.2, 0.3], [1, 0, 1], 1.0, 0.3),  # eps = 1: only the all-agreeing top
    ([0.1, 0.2, 0.3], [1, 1, 0], 1.0, INF),
    ([0.1, 0.5, 0.5, 0.9], [1, 0, 1, 1], 0.75, 0.1),  # 3 of 4 agree
    ([0.1, 0.5, 0.5, 0.9], [1, 0, 1, 1], 0.8, 0.9),  # a cut inside the tied 0.5s would give 2/3
    ([0.4], [1], 0.99, 0.4),  # a single sample
    ([0.4], [0], 0.5, INF),
    ([], [], 0.5, INF),
])
def test_valade_hand_computed(c, t, eps, want):
    assert valade_threshold(np.array(c), np.array(t), eps) == want


def brute_force(c, t, eps):
    for v in sorted(set(c)):
        kept = c >= v
        if t[kept].mean() >= eps:
            return v
    return INF


def test_valade_matches_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(300):
        n = int(rng.integers(1, 40))
        c = rng.choice(np.linspace(0, 1, 11), size=n)  # few distinct values: many ties
        t = rng.random(n) < c
        eps = float(rng.choice([0.0, 0.3, 0.5, 0.8, 0.9, 1.0]))
        assert valade_threshold(c, t, eps) == brute_force(c, t, eps)


@pytest.mark.parametrize("eps", [-0.1, 1.5, float("nan")])
def test_epsilon_outside_unit_interval(eps):
    with pytest.raises(InputError, match="epsilon"):
        valade_threshold(np.array([0.5]), np.array([1]), eps)


def test_risk_controlled_holds_with_probability_one_minus_delta():
    """P(agree | confidence c) = c with c ~ U(0, 1): the agreement of the tokens
    at or above τ is (1 + τ) / 2 exactly, so each run's held-out agreement is known,
    and the ideal τ for ε = 0.9 is 0.8."""
    rng = np.random.default_rng(1)
    eps, delta, runs = 0.9, 0.1, 300
    failures = {"risk": 0, "valade": 0}
    risk_taus = []
    for _ in range(runs):
        c = rng.random(2000)
        t = rng.random(2000) < c
        for name, tau in (("risk", risk_controlled_threshold(c, t, eps, delta)), ("valade", valade_threshold(c, t, eps))):
            true_agreement = 1.0 if tau == INF else (1 + min(tau, 1.0)) / 2
            failures[name] += true_agreement < eps
        risk_taus.append(risk_controlled_threshold(c, t, eps, delta))
    assert failures["risk"] / runs <= delta + 0.03
    # The point-estimate rule misses about half the time: the bound is what makes the difference.
    assert failures["valade"] / runs > 0.2
    # Power: a rule that refuses to certify (inf: no token exits) or certifies far above the ideal
    # satisfies the bound by exiting nothing. A binomial bound at 2000 tokens costs a few hundredths
    # of τ, and refusing outright should be rare.
    taus = np.array(risk_taus)
    finite = taus[np.isfinite(taus)]
    assert np.mean(~np.isfinite(taus)) <= 0.1
    assert 0.8 < np.median(finite) <= 0.87
    assert np.quantile(finite, 0.9) <= 0.97


def test_risk_controlled_is_never_looser_than_needed_on_clean_data():
    c = np.linspace(0, 1, 5000)
    t = np.ones_like(c, dtype=bool)
    assert risk_controlled_threshold(c, t, 0.9, 0.05) == 0.0  # everything agrees: all may exit
    assert risk_controlled_threshold(c, ~t, 0.9, 0.05) == INF


def test_cascade_fits_later_exits_on_what_earlier_ones_keep():
    # Exit 1 takes tokens 0-1 (confidence 0.9); exit 2 must then be fitted on tokens 2-5 only.
    c = np.array([[0.9, 0.9], [0.9, 0.9], [0.1, 0.8], [0.1, 0.7], [0.2, 0.6], [0.2, 0.5]])
    t = np.array([[1, 0], [1, 0], [0, 1], [0, 1], [0, 0], [0, 1]])
    assert cascade_thresholds(c, t, 0.75) == [0.9, 0.5]
    # Fitted on all tokens, exit 2 would need 0.7 (the 0.9s disagree there).
    assert valade_threshold(c[:, 1], t[:, 1], 0.75) == INF


def test_cascade_keeps_overall_agreement_on_its_traces():
    rng = np.random.default_rng(2)
    quality = rng.random(4000)
    c = np.clip(quality[:, None] + rng.normal(0, 0.2, (4000, 3)) + [0.0, 0.1, 0.2], 0, 1)
    t = rng.random((4000, 3)) < c
    for eps in (0.8, 0.9, 0.95):
        taus = cascade_thresholds(c, t, eps)
        remaining = np.ones(len(c), dtype=bool)
        exited_agree = []
        for k, tau in enumerate(taus):
            take = remaining & (c[:, k] >= tau)
            exited_agree.extend(t[take, k])
            remaining &= ~take
        assert np.mean(exited_agree) >= eps


def test_binomial_p_value_against_direct_sum():
    from math import comb

    from eec.calib.thresholds import binomial_p_value

    for n, k, eps in [(10, 9, 0.8), (50, 50, 0.9), (30, 20, 0.5), (7, 0, 0.3)]:
        want = sum(comb(n, j) * eps**j * (1 - eps) ** (n - j) for j in range(k, n + 1))
        assert abs(binomial_p_value(np.array([k]), np.array([n]), eps)[0] - want) < 1e-10


def _joint_by_hand(c: np.ndarray, ok: np.ndarray, eps: float, delta: float) -> float:
    """Every distinct confidence from the top down, each sample walked through its exits one by one, the
    binomial tail from scipy: the last λ before the first that cannot be certified."""
    from scipy.stats import binom

    n, passed = len(c), INF
    for lam in sorted({v for v in c.ravel() if np.isfinite(v)}, reverse=True):
        good = 0
        for i in range(n):
            taken = [k for k in range(c.shape[1]) if c[i, k] >= lam]
            good += bool(ok[i, taken[0]]) if taken else 1
        if binom.sf(good - 1, n, eps) > delta:  # P(Binomial(n, eps) >= good)
            break
        passed = lam
    return passed


@pytest.mark.parametrize("seed", range(4))
def test_joint_threshold_equals_a_walk_over_every_candidate(seed):
    rng = np.random.default_rng(seed)
    n, exits = 150, 3
    c = np.round(rng.random((n, exits)), 2)  # ties, across exits and within one
    c[rng.random((n, exits)) < 0.05] = np.nan  # an undefined score never exits
    ok = rng.random((n, exits)) < 0.5 + 0.5 * np.nan_to_num(c)
    for eps in (0.8, 0.9, 0.95):
        want = _joint_by_hand(c, ok, eps, 0.1)
        assert joint_threshold(c, ok, eps, 0.1) == want
    assert np.isfinite(joint_threshold(c, ok, 0.8, 0.1))  # the walk got somewhere: the test is not all inf


def test_joint_threshold_holds_over_all_samples_with_probability_one_minus_delta():
    """Two exits, confidences U(0, 1), each exit's answer acceptable with probability equal to its confidence:
    at λ the unacceptable share of all samples is (1 - λ)² (1 + λ) / 2 exactly (leave at the first exit with
    probability 1 - λ, at the second with λ (1 - λ), each then wrong with probability (1 - λ) / 2)."""
    rng = np.random.default_rng(2)
    eps, delta, runs, n = 0.9, 0.1, 150, 1000
    lams = []
    for _ in range(runs):
        c = rng.random((n, 2))
        lams.append(joint_threshold(c, rng.random((n, 2)) < c, eps, delta))
    lams = np.array(lams)
    true = 1 - (1 - np.minimum(lams, 1.0)) ** 2 * (1 + np.minimum(lams, 1.0)) / 2
    assert np.mean(true < eps) <= delta + 0.04, np.mean(true < eps)
    ideal = 0.6521  # (1 - λ)² (1 + λ) = 0.2
    assert np.all(np.isfinite(lams))  # power: a thousand samples always certify something
    assert ideal < np.median(lams) <= ideal + 0.05


def test_joint_threshold_refuses_what_cannot_be_certified():
    c = np.linspace(0, 1, 40).reshape(20, 2)
    assert joint_threshold(c, np.ones((20, 2), bool), 0.9, 0.1) == INF  # 20 samples cannot certify 0.9 at δ 0.1
    assert joint_threshold(np.tile(c, (50, 1)), np.ones((1000, 2), bool), 0.9, 0.1) == 0.0
    with pytest.raises(InputError, match="delta"):
        joint_threshold(c, np.ones((20, 2), bool), 0.9, 1.0)
