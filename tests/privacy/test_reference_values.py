"""Published reference values and closed forms the accountants must reproduce."""

from __future__ import annotations

import math

import pytest
from scipy.optimize import brentq
from scipy.stats import norm

from fedtune.privacy.accountants import PLDAccountant, get_accountant, to_dp_event
from fedtune.privacy.events import Composition
from fedtune.privacy.events import SubsampledGaussianEvent as Event


def test_rdp_matches_opacus_published_value():
    # Opacus' RDP accountant test: sigma 1.5, q 0.04, 2250 steps, delta 1e-5 -> epsilon 7.32911117143
    eps = get_accountant("rdp").get_epsilon(Event(0.04, 1.5, 2250), 1e-5)
    assert eps == pytest.approx(7.32911117143, abs=1e-6)


def test_rdp_matches_opacus_accountant_directly():
    from opacus.accountants import RDPAccountant as OpacusRDP

    ours = get_accountant("rdp").get_epsilon([Event(0.01, 1.1, 700), Event(0.03, 2.0, 300)], 1e-6)
    theirs = OpacusRDP()
    theirs.history = [(1.1, 0.01, 700), (2.0, 0.03, 300)]
    # fedtune's orders extend Opacus' defaults, so it can only be tighter, never looser
    assert ours <= theirs.get_epsilon(1e-6) * (1 + 1e-12)
    assert ours == pytest.approx(theirs.get_epsilon(1e-6), rel=1e-3)


def test_pld_matches_dp_accounting_published_value():
    # dp_accounting's PLD accountant test: Poisson q 0.2, Gaussian sigma 0.5, 3 steps -> delta 0.15594 at eps 1
    # (the 1e-3 grid gives the same delta to 1e-7 as the default 1e-4 grid, 10x faster)
    delta = PLDAccountant(value_discretization_interval=1e-3).get_delta(Event(0.2, 0.5, 3), 1.0)
    assert delta == pytest.approx(0.15594, abs=1e-3)
    assert get_accountant("pld").kind == "upper-bound"


def test_to_dp_event_structure():
    import dp_accounting

    single = to_dp_event(Composition((Event(0.1, 1.0, 5), Event(0.1, 1.0, 7))))
    assert single == dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(1.0)), 12
    )
    composed = to_dp_event(Composition((Event(0.1, 1.0, 5), Event(0.2, 2.0, 3))))
    assert isinstance(composed, dp_accounting.ComposedDpEvent) and len(composed.events) == 2


# -- q = 1: the Gaussian mechanism, in closed form (Balle & Wang 2018) --------------------------------
def gaussian_delta(eps: float, mu: float) -> float:
    return norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2)


def gaussian_epsilon(delta: float, mu: float) -> float:
    return brentq(lambda e: gaussian_delta(e, mu) - delta, 0.0, 200.0, xtol=1e-14, rtol=1e-15)


GAUSSIAN_CELLS = [(5.0, 10), (3.0, 4), (10.0, 100), (0.8, 1)]  # (sigma, steps): mu = sqrt(T)/sigma


@pytest.mark.parametrize("name", ["edgeworth", "edgeworth1"])
@pytest.mark.parametrize("sigma, steps", GAUSSIAN_CELLS)
def test_edgeworth_is_exact_for_the_gaussian_mechanism(name, sigma, steps):
    acc = get_accountant(name)
    mu = math.sqrt(steps) / sigma
    ev = Event(1.0, sigma, steps)
    for eps in (0.1, 0.5, 1.0, 2.0, 4.0):
        assert acc.get_delta(ev, eps) == pytest.approx(gaussian_delta(eps, mu), rel=1e-6), eps
    for delta in (1e-5, 1e-6):
        assert acc.get_epsilon(ev, delta) == pytest.approx(gaussian_epsilon(delta, mu), rel=1e-6), delta


@pytest.mark.parametrize("sigma, steps", GAUSSIAN_CELLS[:2])
def test_pld_agrees_with_the_gaussian_mechanism(sigma, steps):
    acc = PLDAccountant(value_discretization_interval=1e-3)
    mu = math.sqrt(steps) / sigma
    ev = Event(1.0, sigma, steps)
    for eps in (0.5, 1.0, 2.0):
        exact = gaussian_delta(eps, mu)
        got = acc.get_delta(ev, eps)
        assert got == pytest.approx(exact, rel=1e-3)
        assert got >= exact * (1 - 1e-9)  # pessimistic
    for delta in (1e-5, 1e-6):
        assert acc.get_epsilon(ev, delta) == pytest.approx(gaussian_epsilon(delta, mu), rel=1e-3)


def test_gaussian_heterogeneous_composition_is_one_gaussian():
    # sigma_1, sigma_2 at q = 1 compose to mu^2 = sum T_i / sigma_i^2
    comp = [Event(1.0, 4.0, 5), Event(1.0, 2.0, 2)]
    mu = math.sqrt(5 / 16 + 2 / 4)
    for name in ("edgeworth", "edgeworth1"):
        assert get_accountant(name).get_epsilon(comp, 1e-5) == pytest.approx(gaussian_epsilon(1e-5, mu), rel=1e-6)
