"""The Edgeworth accountant and the shared root search (edgeworth.py, _search.py)."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
from scipy.stats import norm

from fedtune.privacy.accountants import AccountingError, EdgeworthAccountant, get_accountant
from fedtune.privacy.accountants._search import increasing_root, last_crossing
from fedtune.privacy.accountants.edgeworth import survival_edgeworth
from fedtune.privacy.events import Composition
from fedtune.privacy.events import SubsampledGaussianEvent as Event
from fedtune.privacy.plrv import plrv_for


# -- survival function ----------------------------------------------------------------------------
def test_survival_reduces_to_normal_without_higher_cumulants():
    kappa = np.array([0.0, 0.7, 2.5, 0.0, 0.0])
    x = np.linspace(-6, 12, 37)
    expected = norm.sf((x - 0.7) / math.sqrt(2.5))
    for order in (1, 2):
        np.testing.assert_allclose(survival_edgeworth(x, kappa, order), expected, rtol=1e-12, atol=1e-300)


def test_survival_scaled_far_tail_neither_overflows_nor_underflows():
    kappa = np.array([0.0, 0.0, 1.0, 0.0, 0.0])
    # exp(700) * S(45): both factors are out of double range on their own side, the product is not
    value = survival_edgeworth(np.array([45.0]), kappa, 2, log_scale=np.array([700.0]))[0]
    expected = math.exp(700.0 + norm.logsf(45.0))
    assert math.isfinite(value) and value == pytest.approx(expected, rel=1e-10)


def test_survival_correction_terms():
    # order 1 adds lam3/6 He2(z) phi(z); order 2 adds lam4/24 He3 + lam3^2/72 He5
    k2, k3, k4 = 2.0, 0.3, 0.2
    kappa = np.array([0.0, 0.0, k2, k3, k4])
    x = 1.3
    z = x / math.sqrt(k2)
    lam3, lam4 = k3 / k2**1.5, k4 / k2**2
    first = norm.sf(z) + norm.pdf(z) * lam3 / 6 * (z**2 - 1)
    second = first + norm.pdf(z) * (lam4 / 24 * (z**3 - 3 * z) + lam3**2 / 72 * (z**5 - 10 * z**3 + 15 * z))
    assert survival_edgeworth(np.array([x]), kappa, 1)[0] == pytest.approx(first, rel=1e-12)
    assert survival_edgeworth(np.array([x]), kappa, 2)[0] == pytest.approx(second, rel=1e-12)


# -- accountant ----------------------------------------------------------------------------------
def test_cumulants_add_over_a_heterogeneous_composition():
    a, b = Event(0.02, 1.2, 300), Event(0.05, 0.9, 70)
    under_p, under_q = EdgeworthAccountant._cumulants(Composition((a, b, a)))
    expected_p = 600 * plrv_for(0.02, 1.2).cumulants(0.0) + 70 * plrv_for(0.05, 0.9).cumulants(0.0)
    expected_q = 600 * plrv_for(0.02, 1.2).cumulants(-1.0) + 70 * plrv_for(0.05, 0.9).cumulants(-1.0)
    np.testing.assert_allclose(under_p, expected_p, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(under_q, expected_q, rtol=1e-12, atol=1e-15)


def test_orders_differ_when_subsampled():
    ev = Event(0.02, 1.2, 500)
    e1 = get_accountant("edgeworth1").get_epsilon(ev, 1e-5)
    e2 = get_accountant("edgeworth").get_epsilon(ev, 1e-5)
    assert abs(e1 / e2 - 1) > 1e-3  # the fourth-order terms matter
    assert abs(e1 / e2 - 1) < 0.05


def test_delta_is_the_worse_of_both_directions():
    acc = get_accountant("edgeworth")
    comp = Composition((Event(0.05, 1.0, 400),))
    curve, _ = acc._delta_curve(comp)
    under_p, under_q = acc._cumulants(comp)
    flip = np.array([1.0, -1.0, 1.0, -1.0, 1.0])
    for eps in (0.5, 2.0, 5.0):
        remove = survival_edgeworth(eps, under_p, 2) - survival_edgeworth(eps, under_q, 2, log_scale=eps)
        add = survival_edgeworth(eps, flip * under_q, 2) - survival_edgeworth(eps, flip * under_p, 2, log_scale=eps)
        assert float(curve(eps)) == pytest.approx(max(float(remove), float(add)), rel=1e-14)
        assert acc.get_delta(comp, eps) == pytest.approx(max(float(remove), float(add)), rel=1e-14)


def test_cost_is_independent_of_steps():
    # cumulants scale with T: 10,000 steps cost no more quadrature than 10
    acc = get_accountant("edgeworth")
    eps_small = acc.get_epsilon(Event(0.0123, 1.7, 10), 1e-5)
    eps_large = acc.get_epsilon(Event(0.0123, 1.7, 10_000), 1e-5)
    assert eps_large > eps_small
    assert plrv_for(0.0123, 1.7).cumulants(0.0) is plrv_for(0.0123, 1.7).cumulants(0.0)


def _random_cells(seed: int, n: int):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        q = float(np.exp(rng.uniform(math.log(0.002), math.log(0.3))))
        sigma = float(rng.uniform(0.5, 3.0))
        steps = int(np.exp(rng.uniform(math.log(5), math.log(5000))))
        delta = float(np.exp(rng.uniform(math.log(1e-9), math.log(1e-3))))
        yield q, sigma, steps, delta


@pytest.mark.parametrize("name", ["edgeworth", "edgeworth1"])
def test_root_search_returns_a_true_root(name, caplog):
    """delta(epsilon(delta)) == delta whenever the scan saw a single crossing (no spurious roots)."""
    acc = get_accountant(name)
    checked = 0
    for q, sigma, steps, delta in _random_cells(seed=7, n=80):
        ev = Event(q, sigma, steps)
        curve, guess = acc._delta_curve(Composition((ev,)))
        with caplog.at_level(logging.ERROR):
            crossing = last_crossing(lambda e, curve=curve: float(curve(e)), delta, 0.0, guess, what="test")
        eps = acc.get_epsilon(ev, delta)
        if crossing is None:
            assert eps == 0.0
            continue
        assert eps == crossing.x
        if crossing.crossings == 1:
            checked += 1
            back = acc.get_delta(ev, eps)
            assert back == pytest.approx(delta, rel=1e-6), (q, sigma, steps, delta, eps, back)
    assert checked >= 60  # the check ran on most cells


# -- the shared root search ----------------------------------------------------------------------
def test_last_crossing_picks_the_largest_root_and_counts_crossings(caplog):
    # decreasing overall, with a bump: crosses 0.6 downward at x = 0.8 and x = 3.8 (upward at 1.85)
    def f(x: float) -> float:
        if x < 1.5:
            return 1.0 - 0.5 * x
        if x < 2.5:
            return 0.25 + (x - 1.5)
        return 1.25 - 0.5 * (x - 2.5)

    with caplog.at_level(logging.WARNING):
        crossing = last_crossing(f, 0.6, 0.0, 1.0, what="bumpy")
    assert crossing is not None
    assert crossing.x == pytest.approx(3.8, abs=1e-9)
    assert crossing.crossings == 2
    assert "crosses the target" in caplog.text


def test_last_crossing_single_root():
    crossing = last_crossing(lambda x: math.exp(-x), 1e-5, 0.0, 1.0, what="exp")
    assert crossing is not None and crossing.crossings == 1
    assert crossing.x == pytest.approx(math.log(1e5), rel=1e-12)


def test_last_crossing_none_when_already_below():
    assert last_crossing(lambda x: 0.1 * math.exp(-x), 0.5, 0.0, 1.0, what="low") is None


def test_last_crossing_refuses_an_unbracketable_target():
    with pytest.raises(AccountingError, match="could not bracket flat"):
        last_crossing(lambda x: 1.0, 0.5, 0.0, 1.0, what="flat")


def test_last_crossing_accepts_a_jump_only_when_the_bracket_collapses_on_it():
    step = lambda x: 1.0 if x < math.pi else 0.0  # noqa: E731
    crossing = last_crossing(step, 0.5, 0.0, 1.0, what="step")
    assert crossing is not None and crossing.x == pytest.approx(math.pi, rel=1e-9)


def test_increasing_root():
    assert increasing_root(lambda s: s**3, 27.0, 0.0, 1.0, what="cube") == pytest.approx(3.0, rel=1e-12)
    with pytest.raises(AccountingError, match="already above"):
        increasing_root(lambda s: s + 10, 1.0, 0.0, 1.0, what="shifted")
    with pytest.raises(AccountingError, match="could not bracket bounded"):
        increasing_root(lambda s: -math.exp(-s), 1.0, 0.0, 1.0, what="bounded")


def test_no_silent_zero_epsilon_for_a_subsampled_mechanism():
    """Where the expansion's delta(0) is already below the target, an error, not epsilon = 0."""
    from fedtune.privacy.accountants import AccountingError, get_accountant
    from fedtune.privacy.events import SubsampledGaussianEvent

    for name in ("edgeworth", "edgeworth1"):
        with pytest.raises(AccountingError, match="no trustworthy epsilon"):
            get_accountant(name).get_epsilon(SubsampledGaussianEvent(0.001, 0.5, 100), 1e-5)  # pld: 2.109
