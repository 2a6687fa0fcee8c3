r"""Empirical privacy auditing: an epsilon *lower bound* from one training run, and a membership attack.

Two statistics, both computed from scores the caller obtained from a trained model:

* :func:`one_run_audit`: the one-run auditing method of Steinke, Nasr and Jagielski, "Privacy
  Auditing with One (1) Training Run" (NeurIPS 2023, arXiv 2305.08846). ``m`` canaries are each
  included in the training data independently with probability 1/2; the auditor scores every
  canary, guesses IN for the ``k+`` highest scores and OUT for the ``k-`` lowest (abstaining on the
  rest), and counts its correct guesses. If training were ``(epsilon, delta)``-DP, that many correct
  guesses would be unlikely; the largest epsilon that the count rejects at the chosen confidence is
  an empirical lower bound on the run's true epsilon.
* :func:`loss_threshold_attack`: the loss-threshold membership inference attack of Yeom et al.
  (CSF 2018, arXiv 1709.01604) on real members vs non-members: AUC (through the Mann-Whitney U
  statistic) and the true-positive rate at a low false-positive rate (1% by default) on the
  empirical ROC.

The binomial tails come from :mod:`scipy.stats`, root finding from :mod:`scipy.optimize`, the ROC from
scikit-learn. See docs/privacy.md, "Auditing: what the empirical epsilon means".
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import optimize, stats

__all__ = [
    "DEFAULT_GUESS_FRACTIONS",
    "MembershipInference",
    "OneRunAudit",
    "default_guess_counts",
    "epsilon_lower_bound",
    "loss_threshold_attack",
    "one_run_audit",
    "one_run_p_value",
    "roc_of_losses",
]

#: Guesses ``r = k+ + k-`` tried by :func:`one_run_audit` by default, as fractions of the canaries,
#: split evenly between IN and OUT guesses. The bound is Bonferroni-corrected for trying all of them.
DEFAULT_GUESS_FRACTIONS: tuple[float, ...] = (0.02, 0.05, 0.1, 0.2, 0.5, 1.0)

#: Grid of the scan for the first epsilon the test no longer rejects (see :func:`epsilon_lower_bound`).
_SCAN_POINTS = 2001
_SCAN_CHUNK = 200


# -- argument checks ---------------------------------------------------------------------------------------
def _count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    return int(value)


def _probability(name: str, value: object, allowed: str) -> float:
    """A real number; the caller states the interval in ``allowed`` and checks it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(float(value)):
        raise ValueError(f"{name} must be a number in {allowed}, got {value!r}")
    return float(value)


def _confidence(value: object) -> float:
    c = _probability("confidence", value, "(0, 1)")
    if not 0.0 < c < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {value!r}")
    return c


def _delta(value: object) -> float:
    d = _probability("delta", value, "[0, 1]")
    if not 0.0 <= d <= 1.0:
        raise ValueError(f"delta must be in [0, 1], got {value!r}")
    return d


def _counts(m: object, r: object, v: object) -> tuple[int, int, int]:
    m_, r_, v_ = _count("canaries m", m), _count("guesses r", r), _count("correct guesses v", v)
    if r_ > m_:
        raise ValueError(f"guesses r must be in [0, m] = [0, {m_}] (at most one guess per canary), got {r_}")
    if v_ > r_:
        raise ValueError(f"correct guesses v must be in [0, r] = [0, {r_}], got {v_}")
    return m_, r_, v_


# -- the one-run bound -------------------------------------------------------------------------------------
def one_run_p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    r"""Probability of at least ``v`` correct guesses out of ``r`` if training is ``(epsilon, delta)``-DP.

    The approximate-DP form of the main theorem of Steinke, Nasr and Jagielski (arXiv 2305.08846):
    let each of ``m`` canaries be included independently with probability 1/2, let the auditor make
    ``r`` guesses (IN or OUT) and abstain on the other ``m - r`` canaries, and let :math:`W` be the
    number of correct guesses. If the mechanism is :math:`(\varepsilon, \delta)`-DP then for every
    :math:`v`

    .. math::

        P[W \ge v] \le f(v) + 2 m \delta \max_{i \in \{1, \dots, v\}} \frac{f(v - i) - f(v)}{i},
        \qquad f(u) = P[\mathrm{Binomial}(r, p_\varepsilon) \ge u],
        \quad p_\varepsilon = \frac{e^\varepsilon}{1 + e^\varepsilon},

    where :math:`p_\varepsilon` is the accuracy of :math:`\varepsilon`-DP randomized response. With
    :math:`\delta = 0` this is the pure-DP statement :math:`P[W \ge v] \le f(v)`. The right-hand
    side, capped at 1, is the p-value of the null hypothesis "the run is (epsilon, delta)-DP"; it is
    computed as the paper's own procedure (its appendix), with :func:`scipy.stats.binom` tails.

    Parameters
    ----------
    m : int
        Canaries (each included with probability 1/2), ``m >= 0``.
    r : int
        Guesses made, ``0 <= r <= m``.
    v : int
        Correct guesses, ``0 <= v <= r``.
    epsilon : float
        The hypothesised epsilon, ``>= 0`` (``inf`` gives 1).
    delta : float
        The hypothesised delta, in ``[0, 1]``.

    Returns
    -------
    float
        The p-value, in ``[0, 1]``.

    Raises
    ------
    ValueError
        Negative counts, ``r > m``, ``v > r``, ``epsilon < 0`` or ``delta`` outside ``[0, 1]``.
    """
    m, r, v = _counts(m, r, v)
    eps = _probability("epsilon", epsilon, "[0, inf]")
    if eps < 0:
        raise ValueError(f"epsilon must be in [0, inf], got {epsilon!r}")
    d = _delta(delta)
    if math.isinf(eps):
        return 1.0
    return float(_p_values(m, r, v, np.array([eps]), d)[0])


def _p_values(m: int, r: int, v: int, epsilons: np.ndarray, delta: float) -> np.ndarray:
    """:func:`one_run_p_value` for an array of finite epsilons (arguments already checked)."""
    if v == 0:
        return np.ones_like(epsilons, dtype=float)
    accuracy = 1.0 / (1.0 + np.exp(-epsilons))  # e^eps / (1 + e^eps), overflow-safe
    p = stats.binom.sf(v - 1, r, accuracy)  # P[Binomial(r, p_eps) >= v]
    if delta > 0.0:
        # max over i in 1..v of P[v - i <= Binomial < v] / i: the pmf below v summed outwards, over its length
        below = stats.binom.pmf(np.arange(v - 1, -1, -1)[None, :], r, accuracy[:, None])
        p = p + 2.0 * m * delta * np.max(np.cumsum(below, axis=1) / np.arange(1, v + 1)[None, :], axis=1)
    return np.minimum(np.asarray(p, dtype=float), 1.0)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, confidence: float = 0.95) -> float:
    r"""Empirical epsilon lower bound from ``v`` correct out of ``r`` guesses on ``m`` canaries.

    The bound is :math:`\hat\varepsilon = \inf\{\varepsilon \ge 0 : p(\varepsilon) \ge 1 - c\}` with
    :math:`p` = :func:`one_run_p_value` and :math:`c` the confidence: every smaller epsilon is
    rejected at level :math:`1 - c`, so if the run were :math:`(\varepsilon, \delta)`-DP with
    :math:`\varepsilon < \hat\varepsilon`, the test would have rejected a true hypothesis, which
    happens with probability at most :math:`1 - c`. Hence :math:`P[\hat\varepsilon > \varepsilon] \le
    1 - c`: a lower bound at confidence :math:`c`. The paper searches by bisection, which finds *a*
    crossing of :math:`1 - c`; with :math:`\delta > 0` the p-value need not be monotone in epsilon,
    so this takes the *first* crossing: a scan of the bracket on a 2,001-point grid, then Brent's
    method (:func:`scipy.optimize.brentq`) between the last rejected and the first accepted point.
    With :math:`\delta = 0` and all guesses correct (:math:`v = r`) the bound has the closed form
    :math:`\log(p^* / (1 - p^*))`, :math:`p^* = (1 - c)^{1/r}`.

    Parameters
    ----------
    m, r, v : int
        Canaries, guesses and correct guesses (``0 <= v <= r <= m``).
    delta : float
        The delta of the DP guarantee being audited, in ``[0, 1]``.
    confidence : float
        In ``(0, 1)``; 0.95 gives a 95% lower bound.

    Returns
    -------
    float
        The lower bound, ``>= 0`` (0 when even epsilon = 0 cannot be rejected).

    Raises
    ------
    ValueError
        As :func:`one_run_p_value`, or ``confidence`` outside ``(0, 1)``.
    """
    m, r, v = _counts(m, r, v)
    d = _delta(delta)
    alpha = 1.0 - _confidence(confidence)

    def excess(eps: float) -> float:
        return one_run_p_value(m, r, v, eps, d) - alpha

    if excess(0.0) >= 0.0:
        return 0.0
    high = 1.0
    while excess(high) < 0.0:  # p -> 1 as epsilon -> inf for v >= 1, so this ends
        high *= 2.0
    grid = np.linspace(0.0, high, _SCAN_POINTS)  # grid[0] is rejected, grid[-1] is not
    for start in range(1, _SCAN_POINTS, _SCAN_CHUNK):  # chunks bound the memory of the pmf table to ~v x chunk
        accepted = np.flatnonzero(_p_values(m, r, v, grid[start : start + _SCAN_CHUNK], d) >= alpha)
        if len(accepted):
            first = start + int(accepted[0])
            return float(optimize.brentq(excess, float(grid[first - 1]), float(grid[first]), xtol=1e-10))
    raise AssertionError("unreachable: the last grid point is not rejected")  # pragma: no cover


def default_guess_counts(m: int, fractions: Sequence[float] = DEFAULT_GUESS_FRACTIONS) -> tuple[tuple[int, int], ...]:
    """The ``(k+, k-)`` pairs :func:`one_run_audit` tries: ``k+ = k- = max(1, round(f m / 2))`` per fraction.

    Pairs are deduplicated and never exceed ``m`` guesses in all.

    Raises
    ------
    ValueError
        ``m < 2`` or a fraction outside ``(0, 1]``.
    """
    m = _count("canaries m", m)
    if m < 2:
        raise ValueError(f"canaries m must be an integer >= 2 to guess both IN and OUT, got {m}")
    pairs: list[tuple[int, int]] = []
    for f in fractions:
        if isinstance(f, bool) or not isinstance(f, numbers.Real) or not 0.0 < float(f) <= 1.0:
            raise ValueError(f"guess fractions must be in (0, 1], got {f!r}")
        k = min(m // 2, max(1, round(float(f) * m / 2)))
        if (k, k) not in pairs:
            pairs.append((k, k))
    return tuple(pairs)


@dataclass(frozen=True)
class OneRunAudit:
    """Result of :func:`one_run_audit`.

    Attributes
    ----------
    empirical_epsilon : float
        The lower bound: the largest bound over the tried ``(k+, k-)`` pairs, each at the corrected
        confidence ``1 - (1 - confidence) / len(candidates)``. 0 = no leakage detected.
    confidence, delta : float
        The overall confidence of the bound and the delta of the audited guarantee.
    canaries, included : int
        ``m`` and how many of the canaries were in the training data.
    k_pos, k_neg, guesses, correct : int
        The pair that gave the bound: IN guesses, OUT guesses, ``r = k_pos + k_neg`` and correct ones.
    candidates : tuple of (int, int)
        Every ``(k+, k-)`` tried (the Bonferroni correction divides by their number).
    p_value_zero : float
        For the reported pair, the p-value of "epsilon = 0" (no leakage) at the audited delta.
    """

    empirical_epsilon: float
    confidence: float
    delta: float
    canaries: int
    included: int
    k_pos: int
    k_neg: int
    guesses: int
    correct: int
    candidates: tuple[tuple[int, int], ...]
    p_value_zero: float

    @property
    def accuracy(self) -> float:
        """Share of the guesses that were correct (nan without guesses)."""
        return self.correct / self.guesses if self.guesses else math.nan

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (pairs as lists)."""
        data = asdict(self)
        data["candidates"] = [list(pair) for pair in self.candidates]
        data["accuracy"] = self.accuracy
        return data


def one_run_audit(
    scores: Sequence[float] | np.ndarray,
    included: Sequence[bool] | np.ndarray,
    *,
    delta: float,
    confidence: float = 0.95,
    guess_counts: Sequence[tuple[int, int]] | None = None,
) -> OneRunAudit:
    """Audit one training run from its canaries' scores (higher score = more likely IN).

    For each ``(k+, k-)`` in ``guess_counts`` the auditor guesses IN for the ``k+`` highest scores and
    OUT for the ``k-`` lowest, abstains on the rest, counts its correct guesses ``v`` out of
    ``r = k+ + k-``, and computes :func:`epsilon_lower_bound` at confidence
    ``1 - (1 - confidence) / L`` for ``L`` pairs. The result is the largest of these bounds: by the
    union bound it is a lower bound at ``confidence`` overall, although the pair was chosen after
    seeing the scores (a Bonferroni correction; with one pair there is none). The guesses use only
    the scores, never the membership bits; ties in score are broken by the canary's index.

    Parameters
    ----------
    scores : sequence of float
        One finite score per canary.
    included : sequence of bool
        The secret membership bits (True = trained on), one per canary.
    delta : float
        Delta of the audited guarantee (the run's delta), in ``[0, 1]``.
    confidence : float
        Overall confidence in ``(0, 1)`` (default 0.95).
    guess_counts : sequence of (int, int), optional
        ``(k+, k-)`` pairs to try, fixed before looking at the scores; default
        :func:`default_guess_counts` (six symmetric pairs from 2% to 100% of the canaries).

    Returns
    -------
    OneRunAudit

    Raises
    ------
    ValueError
        Scores and bits of different lengths, fewer than 2 canaries, non-finite scores, a pair with
        negative counts or more guesses than canaries, or bad ``delta`` / ``confidence``.
    """
    score = np.asarray(scores, dtype=float)
    bits = np.asarray(included)
    if score.ndim != 1 or bits.shape != score.shape:
        raise ValueError(f"scores and included must be 1-d and of equal length, got {score.shape} and {bits.shape}")
    if bits.dtype != bool:
        raise ValueError(f"included must hold booleans, got dtype {bits.dtype}")
    if not np.all(np.isfinite(score)):
        raise ValueError("scores must be finite numbers (got nan or inf)")
    m = len(score)
    d, c = _delta(delta), _confidence(confidence)
    pairs = tuple(guess_counts) if guess_counts is not None else default_guess_counts(m)
    if not pairs:
        raise ValueError("guess_counts must hold at least one (k+, k-) pair")
    for k_pos, k_neg in pairs:
        _count("k+", k_pos)
        _count("k-", k_neg)
        if k_pos + k_neg > m:
            raise ValueError(f"k+ + k- must be in [0, m] = [0, {m}] (one guess per canary), got {k_pos} + {k_neg}")
    order = np.lexsort((np.arange(m), -score))  # descending score, ties by index
    ranked = bits[order]
    per_pair = 1.0 - (1.0 - c) / len(pairs)
    best: OneRunAudit | None = None
    for k_pos, k_neg in pairs:
        correct = int(ranked[:k_pos].sum()) + int((~ranked[m - k_neg :]).sum() if k_neg else 0)
        r = k_pos + k_neg
        bound = epsilon_lower_bound(m, r, correct, d, per_pair)
        result = OneRunAudit(
            empirical_epsilon=bound,
            confidence=c,
            delta=d,
            canaries=m,
            included=int(bits.sum()),
            k_pos=int(k_pos),
            k_neg=int(k_neg),
            guesses=r,
            correct=correct,
            candidates=tuple((int(a), int(b)) for a, b in pairs),
            p_value_zero=one_run_p_value(m, r, correct, 0.0, d),
        )
        if best is None or (bound, -result.p_value_zero) > (best.empirical_epsilon, -best.p_value_zero):
            best = result  # the largest bound; among equal bounds (e.g. all 0) the strongest evidence
    assert best is not None  # pairs is not empty
    return best


# -- membership inference ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class MembershipInference:
    """Result of :func:`loss_threshold_attack`.

    Attributes
    ----------
    auc : float
        Area under the ROC: the probability that a random member has a lower loss than a random
        non-member (ties count 1/2). 0.5 = chance.
    tpr_at_fpr : float
        Best true-positive rate of a loss threshold whose false-positive rate is at most ``fpr``.
    fpr : float
        The false-positive rate ``tpr_at_fpr`` is read at (0.01 by default).
    members, non_members : int
        Examples in each group.
    mean_member_loss, mean_non_member_loss : float
        Mean losses of the two groups.
    """

    auc: float
    tpr_at_fpr: float
    fpr: float
    members: int
    non_members: int
    mean_member_loss: float
    mean_non_member_loss: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


def _losses(name: str, values: Sequence[float] | np.ndarray) -> np.ndarray:
    array = np.asarray(values, dtype=float)
    if array.ndim != 1 or len(array) == 0:
        raise ValueError(f"{name} must be a non-empty 1-d sequence of losses, got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} must be finite numbers (got nan or inf)")
    return array


def roc_of_losses(
    member_losses: Sequence[float] | np.ndarray, non_member_losses: Sequence[float] | np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """``(fpr, tpr)`` of the empirical ROC of the loss-threshold attack (guess member if loss <= threshold)."""
    from sklearn.metrics import roc_curve

    members, others = _losses("member_losses", member_losses), _losses("non_member_losses", non_member_losses)
    labels = np.concatenate([np.ones(len(members), dtype=int), np.zeros(len(others), dtype=int)])
    fpr, tpr, _ = roc_curve(labels, -np.concatenate([members, others]), drop_intermediate=False)
    return fpr, tpr


def loss_threshold_attack(
    member_losses: Sequence[float] | np.ndarray,
    non_member_losses: Sequence[float] | np.ndarray,
    *,
    fpr: float = 0.01,
) -> MembershipInference:
    r"""The loss-threshold membership inference attack (Yeom et al. 2018): member if the loss is low.

    The AUC is the Mann-Whitney statistic :math:`U` of the scores (negative losses) of members
    against non-members, normalised: :math:`\mathrm{AUC} = U / (n_1 n_0)` (:func:`scipy.stats.mannwhitneyu`).
    The TPR at ``fpr`` is read off the empirical ROC (every threshold): the largest true-positive
    rate among the thresholds whose false-positive rate is at most ``fpr``.

    Parameters
    ----------
    member_losses, non_member_losses : sequence of float
        Per-example losses of examples trained on and of examples not trained on.
    fpr : float
        False-positive rate in ``(0, 1)`` at which the TPR is reported.

    Returns
    -------
    MembershipInference

    Raises
    ------
    ValueError
        Empty or non-finite losses, or ``fpr`` outside ``(0, 1)``.
    """
    members, others = _losses("member_losses", member_losses), _losses("non_member_losses", non_member_losses)
    target = _probability("fpr", fpr, "(0, 1)")
    if not 0.0 < target < 1.0:
        raise ValueError(f"fpr must be in (0, 1), got {fpr!r}")
    u = float(stats.mannwhitneyu(-members, -others, alternative="two-sided").statistic)
    fprs, tprs = roc_of_losses(members, others)
    return MembershipInference(
        auc=u / (len(members) * len(others)),
        tpr_at_fpr=float(np.max(tprs[fprs <= target + 1e-12])),
        fpr=target,
        members=len(members),
        non_members=len(others),
        mean_member_loss=float(members.mean()),
        mean_non_member_loss=float(others.mean()),
    )
