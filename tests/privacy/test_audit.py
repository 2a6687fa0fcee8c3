"""The audit statistics: the one-run epsilon lower bound and the loss-threshold membership attack.

Reference values are computed here by hand (binomial sums with :func:`math.comb`), from the closed
form of the all-correct case, and by simulating randomized response, the mechanism for which the
one-run bound is exact.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from fedtune.privacy.audit import (
    MembershipInference,
    OneRunAudit,
    default_guess_counts,
    epsilon_lower_bound,
    loss_threshold_attack,
    one_run_audit,
    one_run_p_value,
)


def binomial_tail(r: int, v: int, p: float) -> float:
    """P[Binomial(r, p) >= v] summed term by term."""
    return sum(math.comb(r, k) * p**k * (1 - p) ** (r - k) for k in range(v, r + 1))


def all_correct_bound(r: int, confidence: float = 0.95) -> float:
    """delta = 0, v = r: the smallest eps with p_eps^r >= 1 - c is log(p* / (1 - p*)), p* = (1 - c)^(1/r)."""
    p_star = (1 - confidence) ** (1 / r)
    return math.log(p_star / (1 - p_star))


# -- p-value -----------------------------------------------------------------------------------------------
def test_p_value_by_hand_with_delta() -> None:
    # r = v = 2, eps = 0: f(2) = 1/4; max(pmf(1) / 1, (pmf(1) + pmf(0)) / 2) = max(1/2, 3/8) = 1/2
    assert one_run_p_value(10, 2, 2, 0.0, 0.01) == pytest.approx(0.25 + 2 * 10 * 0.01 * 0.5, abs=1e-12)
    # eps = log 3 (p = 3/4): f(2) = 9/16; max(pmf(1), (pmf(1) + pmf(0)) / 2) = max(6/16, 7/32) = 6/16
    assert one_run_p_value(10, 2, 2, math.log(3), 0.01) == pytest.approx(9 / 16 + 0.2 * 6 / 16, abs=1e-12)


@pytest.mark.parametrize(("r", "v", "eps"), [(20, 15, 1.0), (50, 30, 0.2), (7, 7, 2.5), (100, 51, 0.0)])
def test_pure_dp_p_value_is_the_binomial_tail(r: int, v: int, eps: float) -> None:
    accuracy = math.exp(eps) / (1 + math.exp(eps))
    assert one_run_p_value(r, r, v, eps, 0.0) == pytest.approx(binomial_tail(r, v, accuracy), rel=1e-9)


def test_p_value_edges() -> None:
    assert one_run_p_value(10, 5, 0, 1.0, 1e-5) == 1.0  # no correct guess is no evidence
    assert one_run_p_value(10, 5, 5, math.inf, 0.0) == 1.0
    assert one_run_p_value(10**6, 10, 10, 0.0, 0.5) == 1.0  # capped


# -- lower bound -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("r", "expected"), [(10, 1.0519), (100, 3.4930), (1000, 5.8091)])
def test_all_correct_matches_the_closed_form(r: int, expected: float) -> None:
    bound = epsilon_lower_bound(1000, r, r, 0.0, 0.95)
    assert bound == pytest.approx(all_correct_bound(r), abs=1e-7)
    assert bound == pytest.approx(expected, abs=1e-4)
    # at the bound the test sits exactly at the significance level
    assert one_run_p_value(1000, r, r, bound, 0.0) == pytest.approx(0.05, rel=1e-6)


def test_delta_lowers_the_bound() -> None:
    bounds = [epsilon_lower_bound(1000, 1000, 1000, d) for d in (0.0, 1e-5, 1e-4, 1e-3)]
    assert all(b2 < b1 for b1, b2 in zip(bounds, bounds[1:]))
    assert bounds[1] == pytest.approx(bounds[0], abs=0.05)  # little cost at 2 m delta = 0.02
    # the delta term grows with the canaries m, not the guesses: 100 correct guesses prove less among
    # more canaries, and nothing at 2 m delta = 20
    assert epsilon_lower_bound(1000, 100, 100, 1e-5) > epsilon_lower_bound(10**5, 100, 100, 1e-5) > 0.5
    assert epsilon_lower_bound(10**6, 100, 100, 1e-5) == 0.0


def test_bound_is_monotone_in_correct_guesses() -> None:
    bounds = [epsilon_lower_bound(1000, 200, v, 1e-5) for v in range(100, 201, 5)]
    assert all(b2 >= b1 for b1, b2 in zip(bounds, bounds[1:]))
    assert bounds[0] == 0.0 and bounds[-1] > 4.0


@pytest.mark.parametrize(("r", "v"), [(100, 50), (100, 55), (1000, 500), (1000, 520)])
def test_chance_level_gives_zero(r: int, v: int) -> None:
    # 55/100 and 520/1000 are within 2 standard deviations of a coin: not significant at 95%
    assert epsilon_lower_bound(1000, r, v, 1e-5) == 0.0


def test_significant_but_weak_evidence_gives_a_small_bound() -> None:
    # 60 of 100: P[Bin(100, 1/2) >= 60] = 0.028 < 0.05, so eps = 0 is rejected, but barely
    assert binomial_tail(100, 60, 0.5) < 0.05
    bound = epsilon_lower_bound(1000, 100, 60, 0.0)
    assert 0.0 < bound < 0.1
    assert one_run_p_value(1000, 100, 60, bound, 0.0) == pytest.approx(0.05, rel=1e-6)


def test_higher_confidence_gives_a_lower_bound() -> None:
    assert epsilon_lower_bound(1000, 100, 90, 1e-5, 0.99) < epsilon_lower_bound(1000, 100, 90, 1e-5, 0.95)


def test_bound_exceeds_the_true_epsilon_at_most_five_percent_of_the_time() -> None:
    """Randomized response at eps0 is eps0-DP and makes the one-run test exact: simulate it."""
    rng = np.random.default_rng(0)
    eps0, r, trials = 1.0, 200, 400
    correct = rng.binomial(r, math.exp(eps0) / (1 + math.exp(eps0)), size=trials)
    bounds = np.array([epsilon_lower_bound(r, r, int(v), 0.0) for v in correct])
    assert np.mean(bounds > eps0) <= 0.08  # 0.05 in expectation (less: the binomial is discrete)
    assert np.median(bounds) == pytest.approx(0.73, abs=0.15)  # typical bound: below eps0, not far


# -- the audit from scores ---------------------------------------------------------------------------------
def test_guesses_count_correct_in_and_out() -> None:
    scores = [5.0, 4.0, 3.0, 2.0, 1.0, 0.0]
    bits = [True, False, True, False, False, True]
    result = one_run_audit(scores, bits, delta=0.0, guess_counts=[(2, 2)])
    # IN for scores 5, 4 (one member); OUT for 1, 0 (one non-member)
    assert (result.guesses, result.correct, result.k_pos, result.k_neg) == (4, 2, 2, 2)
    assert result.included == 3 and result.canaries == 6
    assert result.empirical_epsilon == 0.0


def test_single_pair_is_not_corrected_and_a_sweep_is() -> None:
    rng = np.random.default_rng(1)
    bits = rng.random(1000) < 0.5
    scores = bits * 2.0 + rng.normal(size=1000)
    single = one_run_audit(scores, bits, delta=1e-5, guess_counts=[(50, 50)])
    assert single.empirical_epsilon == pytest.approx(epsilon_lower_bound(1000, 100, single.correct, 1e-5, 0.95))
    sweep = one_run_audit(scores, bits, delta=1e-5)
    assert sweep.candidates == default_guess_counts(1000)
    per_pair = 1 - 0.05 / len(sweep.candidates)
    assert sweep.empirical_epsilon == pytest.approx(
        epsilon_lower_bound(1000, sweep.guesses, sweep.correct, 1e-5, per_pair)
    )
    assert sweep.empirical_epsilon > 1.0  # a strong signal is detected


def test_perfect_separation_reaches_the_all_correct_bound() -> None:
    bits = np.array([True, False] * 50)
    result = one_run_audit(bits.astype(float), bits, delta=0.0, guess_counts=[(50, 50)])
    assert result.correct == 100
    assert result.empirical_epsilon == pytest.approx(all_correct_bound(100), abs=1e-7)


def test_random_scores_detect_nothing() -> None:
    rng = np.random.default_rng(2)
    hits = [
        one_run_audit(rng.normal(size=500), rng.random(500) < 0.5, delta=1e-5).empirical_epsilon > 0 for _ in range(20)
    ]
    assert sum(hits) <= 2  # at most 5% false detections expected


def test_default_guess_counts() -> None:
    assert default_guess_counts(1000) == ((10, 10), (25, 25), (50, 50), (100, 100), (250, 250), (500, 500))
    assert default_guess_counts(50) == ((1, 1), (2, 2), (5, 5), (12, 12), (25, 25))
    assert all(a + b <= 3 for a, b in default_guess_counts(3))


def test_result_to_dict() -> None:
    result = one_run_audit([1.0, 0.0], [True, False], delta=0.0, guess_counts=[(1, 1)])
    assert isinstance(result, OneRunAudit)
    data = result.to_dict()
    assert data["candidates"] == [[1, 1]] and data["accuracy"] == 1.0
    assert set(data) >= {"empirical_epsilon", "confidence", "delta", "canaries", "guesses", "correct"}


# -- membership inference ----------------------------------------------------------------------------------
def test_auc_by_hand() -> None:
    members, others = [0.1, 0.2, 0.5], [0.3, 0.6, 0.7, 0.05]
    # member below non-member in 3 + 3 + 2 = 8 of 12 pairs
    result = loss_threshold_attack(members, others)
    assert result.auc == pytest.approx(8 / 12, abs=1e-12)
    labels = [1] * 3 + [0] * 4
    assert result.auc == pytest.approx(roc_auc_score(labels, [-x for x in members + others]), abs=1e-12)


def test_auc_counts_ties_as_half() -> None:
    assert loss_threshold_attack([0.5, 0.5], [0.5, 1.0]).auc == pytest.approx((0.5 + 1 + 0.5 + 1) / 4)


def test_tpr_at_one_percent_fpr_by_hand() -> None:
    members = [0.1, 0.2, 0.3, 0.9]
    others = np.linspace(0.25, 1.0, 100)  # one non-member (1%) below 0.26, the next at 0.2576
    result = loss_threshold_attack(members, others)
    assert result.tpr_at_fpr == pytest.approx(0.5)  # the threshold 0.25 takes 0.1, 0.2 and one non-member
    assert loss_threshold_attack(members, others, fpr=0.06).tpr_at_fpr == pytest.approx(0.5)
    assert loss_threshold_attack(members, others, fpr=0.07).tpr_at_fpr == pytest.approx(0.75)  # 0.3 and 7 others
    assert (result.members, result.non_members, result.fpr) == (4, 100, 0.01)


def test_no_signal_gives_chance() -> None:
    rng = np.random.default_rng(3)
    result = loss_threshold_attack(rng.exponential(size=4000), rng.exponential(size=4000))
    assert isinstance(result, MembershipInference)
    assert result.auc == pytest.approx(0.5, abs=0.02)
    assert result.tpr_at_fpr == pytest.approx(0.01, abs=0.01)
    assert result.to_dict()["auc"] == result.auc


# -- refusals ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("confidence", [0.0, 1.0, 1.5, -0.1, float("nan"), "0.9", True])
def test_bad_confidence(confidence: object) -> None:
    with pytest.raises(ValueError, match=r"confidence must be .*\(0, 1\)"):
        epsilon_lower_bound(10, 5, 5, 0.0, confidence)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("m", "r", "v", "message"),
    [
        (-1, 0, 0, r"canaries m must be an integer >= 0, got -1"),
        (10, -2, 0, r"guesses r must be an integer >= 0, got -2"),
        (10, 5, -1, r"correct guesses v must be an integer >= 0, got -1"),
        (10, 11, 5, r"guesses r must be in \[0, m\] = \[0, 10\].*got 11"),
        (10, 5, 6, r"correct guesses v must be in \[0, r\] = \[0, 5\], got 6"),
        (10.5, 5, 5, r"canaries m must be an integer"),
    ],
)
def test_bad_counts(m: object, r: object, v: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        epsilon_lower_bound(m, r, v, 0.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=message):
        one_run_p_value(m, r, v, 1.0, 0.0)  # type: ignore[arg-type]


@pytest.mark.parametrize("delta", [-1e-5, 1.5, float("nan")])
def test_bad_delta(delta: float) -> None:
    with pytest.raises(ValueError, match=r"delta must be .*\[0, 1\]"):
        epsilon_lower_bound(10, 5, 5, delta)


def test_bad_epsilon() -> None:
    with pytest.raises(ValueError, match=r"epsilon must be in \[0, inf\], got -1"):
        one_run_p_value(10, 5, 5, -1.0, 0.0)


def test_bad_audit_input() -> None:
    with pytest.raises(ValueError, match=r"k\+ \+ k- must be in \[0, m\] = \[0, 4\].*3 \+ 2"):
        one_run_audit([1.0, 2.0, 3.0, 4.0], [True] * 4, delta=0.0, guess_counts=[(3, 2)])
    with pytest.raises(ValueError, match=r"k- must be an integer >= 0, got -1"):
        one_run_audit([1.0, 2.0], [True, False], delta=0.0, guess_counts=[(1, -1)])
    with pytest.raises(ValueError, match="equal length"):
        one_run_audit([1.0, 2.0], [True], delta=0.0)
    with pytest.raises(ValueError, match="booleans"):
        one_run_audit([1.0, 2.0], [1, 0], delta=0.0)
    with pytest.raises(ValueError, match="finite"):
        one_run_audit([1.0, float("nan")], [True, False], delta=0.0)
    with pytest.raises(ValueError, match="at least one"):
        one_run_audit([1.0, 2.0], [True, False], delta=0.0, guess_counts=[])
    with pytest.raises(ValueError, match=r"canaries m must be an integer >= 2"):
        default_guess_counts(1)


def test_bad_attack_input() -> None:
    with pytest.raises(ValueError, match=r"fpr must be .*\(0, 1\), got 1.0"):
        loss_threshold_attack([0.1], [0.2], fpr=1.0)
    with pytest.raises(ValueError, match="member_losses must be a non-empty"):
        loss_threshold_attack([], [0.2])
    with pytest.raises(ValueError, match="non_member_losses must be finite"):
        loss_threshold_attack([0.1], [float("inf")])
