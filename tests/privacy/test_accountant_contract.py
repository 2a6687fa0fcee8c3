"""The contract every registered accountant honours (fedtune.privacy.accountants).

One class, parametrized over ``available_accountants()``: a new accountant gets every check for free
once it declares its tolerances in ``TOLERANCES`` (a missing entry fails loudly).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest

from fedtune.privacy.accountants import (
    Accountant,
    PLDAccountant,
    available_accountants,
    get_accountant,
    register_accountant,
)
from fedtune.privacy.accountants import base as accountants_base
from fedtune.privacy.events import Composition
from fedtune.privacy.events import SubsampledGaussianEvent as Event

DELTA = 1e-5
BASE = (0.02, 1.2, 500)  # (q, sigma, steps): a cell every accountant handles quickly
# moderate DP-SGD cells (q, sigma, steps) for the comparison with the certified pld reference
PLD_CELLS = [(0.01, 1.0, 1000), (0.02, 1.2, 500), (0.05, 0.8, 300), (0.03, 1.5, 2000)]


@dataclass(frozen=True)
class Tol:
    vs_pld: float  # |eps / eps_pld - 1| on PLD_CELLS
    compose_rel: float  # [T, T] vs 2T and reordering of a heterogeneous composition
    inverse_eps_abs: float  # |eps(delta(eps)) - eps| <= inverse_eps_abs + inverse_rel * eps
    inverse_rel: float  # also |delta(eps(delta)) / delta - 1|
    inverse_delta_rel: float | None = None  # override for the delta-side check


TOLERANCES = {
    # where the expansion is not trusted, saddlepoint answers with the certified PLD, whose epsilon and
    # delta queries sit on epsilon-adaptive loss grids: round trips then agree to ~1e-6, not 1e-9
    "saddlepoint": Tol(vs_pld=0.01, compose_rel=1e-9, inverse_eps_abs=0.0, inverse_rel=1e-5),
    "edgeworth": Tol(vs_pld=0.10, compose_rel=1e-9, inverse_eps_abs=0.0, inverse_rel=1e-6),
    "edgeworth1": Tol(vs_pld=0.10, compose_rel=1e-9, inverse_eps_abs=0.0, inverse_rel=1e-6),
    "rdp": Tol(vs_pld=0.20, compose_rel=1e-9, inverse_eps_abs=0.0, inverse_rel=1e-6),
    "pld": Tol(vs_pld=0.005, compose_rel=1e-6, inverse_eps_abs=0.0, inverse_rel=1e-6),
    # one discrete PLD per composition (the grid depends on it, not on delta or epsilon): exact inverses
    "pld-fast": Tol(vs_pld=0.005, compose_rel=1e-9, inverse_eps_abs=0.0, inverse_rel=1e-9),
    # Opacus' PRV get_epsilon returns the upper end of its eps_error = 0.01 window, so the round trip
    # through delta is off by up to ~eps_error in epsilon (a few % in delta at delta ~ 1e-5).
    "prv": Tol(vs_pld=0.02, compose_rel=1e-6, inverse_eps_abs=0.02, inverse_rel=1e-6, inverse_delta_rel=0.15),
}

ACCOUNTANTS = available_accountants()


def test_builtin_accountants_are_registered():
    assert {"edgeworth", "edgeworth1", "saddlepoint", "pld", "rdp", "prv"} <= set(ACCOUNTANTS)


def test_every_accountant_declares_test_tolerances():
    missing = sorted(set(ACCOUNTANTS) - set(TOLERANCES))
    assert not missing, f"accountants without contract tolerances in this file: {missing}"


@pytest.mark.parametrize("name", ACCOUNTANTS)
class TestAccountantContract:
    @pytest.fixture
    def acc(self, name, make_accountant) -> Accountant:
        return make_accountant(name)

    @pytest.fixture
    def tol(self, name) -> Tol:
        return TOLERANCES[name]

    # -- identity --------------------------------------------------------------------------
    def test_registry_identity(self, name):
        acc = get_accountant(name)
        assert isinstance(acc, Accountant)
        assert acc.name == name
        assert acc.kind in {"estimate", "upper-bound"}
        assert get_accountant(acc) is acc
        assert name in repr(acc)
        assert get_accountant(name) is not acc  # a fresh instance each time

    # -- values ----------------------------------------------------------------------------
    def test_returns_non_negative_floats(self, acc):
        ev = Event(*BASE)
        eps = acc.get_epsilon(ev, DELTA)
        assert type(eps) is float and math.isfinite(eps) and eps > 0.0
        d = acc.get_delta(ev, 2.0)
        assert type(d) is float and 0.0 < d < 1.0
        d0 = acc.get_delta(ev, 0.0)
        assert type(d0) is float and d <= d0 <= 1.0
        assert acc.get_delta(ev, math.inf) == 0.0

    def test_accepts_event_composition_or_sequence(self, acc):
        ev = Event(*BASE)
        eps = acc.get_epsilon(ev, DELTA)
        assert acc.get_epsilon(Composition((ev,)), DELTA) == eps
        assert acc.get_epsilon([ev], DELTA) == eps

    def test_epsilon_strictly_decreases_in_sigma(self, acc):
        q, _, steps = BASE
        eps = [acc.get_epsilon(Event(q, sigma, steps), DELTA) for sigma in (1.0, 1.2, 1.5)]
        assert eps[0] > eps[1] > eps[2] > 0, eps

    def test_epsilon_strictly_increases_in_steps(self, acc):
        q, sigma, _ = BASE
        eps = [acc.get_epsilon(Event(q, sigma, steps), DELTA) for steps in (250, 500, 1000)]
        assert 0 < eps[0] < eps[1] < eps[2], eps

    def test_delta_strictly_decreases_in_epsilon(self, acc):
        ev = Event(*BASE)
        deltas = [acc.get_delta(ev, eps) for eps in (1.0, 1.5, 2.0, 3.0)]
        assert all(a > b for a, b in zip(deltas, deltas[1:])), deltas
        assert deltas[-1] > 0

    def test_epsilon_of_delta_of_epsilon(self, acc, tol):
        ev = Event(*BASE)
        for eps in (1.0, 2.0):
            back = acc.get_epsilon(ev, acc.get_delta(ev, eps))
            assert back == pytest.approx(eps, rel=tol.inverse_rel, abs=tol.inverse_eps_abs), (eps, back)

    def test_delta_of_epsilon_of_delta(self, acc, tol):
        ev = Event(*BASE)
        rel = tol.inverse_delta_rel if tol.inverse_delta_rel is not None else tol.inverse_rel
        for delta in (1e-5, 1e-3):
            back = acc.get_delta(ev, acc.get_epsilon(ev, delta))
            assert back == pytest.approx(delta, rel=rel), (delta, back)

    def test_smaller_delta_needs_larger_epsilon(self, acc):
        ev = Event(*BASE)
        assert acc.get_epsilon(ev, 1e-7) > acc.get_epsilon(ev, 1e-5) > acc.get_epsilon(ev, 1e-3)

    # -- composition -----------------------------------------------------------------------
    def test_self_composition_equals_doubled_steps(self, acc, tol):
        q, sigma, steps = BASE
        half = Event(q, sigma, steps // 2)
        whole = Event(q, sigma, steps)
        assert acc.get_epsilon([half, half], DELTA) == pytest.approx(acc.get_epsilon(whole, DELTA), rel=tol.compose_rel)
        assert acc.get_delta([half, half], 2.0) == pytest.approx(acc.get_delta(whole, 2.0), rel=tol.compose_rel)
        uneven = [Event(q, sigma, 100), Event(q, sigma, steps - 100)]
        assert acc.get_epsilon(uneven, DELTA) == pytest.approx(acc.get_epsilon(whole, DELTA), rel=tol.compose_rel)

    def test_heterogeneous_composition_is_order_independent(self, acc, tol):
        a, b, c = Event(0.02, 1.5, 300), Event(0.05, 2.0, 200), Event(0.01, 1.2, 400)
        eps = [acc.get_epsilon(order, DELTA) for order in ([a, b, c], [c, a, b])]
        assert eps[1] == pytest.approx(eps[0], rel=tol.compose_rel)
        deltas = [acc.get_delta(order, 2.5) for order in ([a, b, c], [b, c, a])]
        assert deltas[1] == pytest.approx(deltas[0], rel=tol.compose_rel)
        assert 0 < deltas[0] < 1e-4
        # and composing costs more than any part alone
        assert eps[0] > max(acc.get_epsilon(e, DELTA) for e in (a, b, c))

    # -- closeness to the certified reference ----------------------------------------------
    @pytest.mark.parametrize("cell", PLD_CELLS, ids=lambda c: "q{}-s{}-T{}".format(*c))
    def test_close_to_pld(self, acc, tol, cell, reference_pld_epsilon):
        reference = reference_pld_epsilon(*cell, DELTA)  # pld on the 1e-3 grid
        if acc.name == "pld":  # compare a finer grid with the reference, not the reference with itself
            acc = PLDAccountant(value_discretization_interval=5e-4)
            acc.name = "pld"  # type: ignore[misc]
        eps = acc.get_epsilon(Event(*cell), DELTA)
        assert eps == pytest.approx(reference, rel=tol.vs_pld), (eps, reference)
        if acc.kind == "upper-bound":
            assert eps >= reference * (1 - 0.005), f"upper bound {eps} is below the pld reference {reference}"
        if acc.name == "rdp":
            assert eps >= reference, "RDP is a looser certified bound than PLD"

    # -- bad input -------------------------------------------------------------------------
    @pytest.mark.parametrize("q, shown", [(0.0, "0.0"), (-0.1, "-0.1"), (1.5, "1.5"), (math.inf, "inf")])
    def test_bad_sampling_rate(self, acc, q, shown):
        with pytest.raises(ValueError) as err:
            acc.get_epsilon(Event(q, 1.0, 10), DELTA)
        assert shown in str(err.value) and "(0, 1]" in str(err.value)

    @pytest.mark.parametrize("sigma, shown", [(0.0, "0.0"), (-1.0, "-1.0"), (math.inf, "inf")])
    def test_bad_noise_multiplier(self, acc, sigma, shown):
        with pytest.raises(ValueError) as err:
            acc.get_delta(Event(0.1, sigma, 10), 1.0)
        assert shown in str(err.value) and "(0, inf)" in str(err.value)

    @pytest.mark.parametrize("steps", [0, -5])
    def test_bad_steps(self, acc, steps):
        with pytest.raises(ValueError) as err:
            acc.get_epsilon(Event(0.1, 1.0, steps), DELTA)
        assert f"got {steps}" in str(err.value) and ">= 1" in str(err.value)

    @pytest.mark.parametrize("steps", [2.5, 100.0])
    def test_non_integer_steps(self, acc, steps):
        with pytest.raises(TypeError) as err:
            acc.get_epsilon(Event(0.1, 1.0, steps), DELTA)
        assert repr(steps) in str(err.value) and "integer" in str(err.value)

    @pytest.mark.parametrize(
        "delta, shown", [(0.0, "0.0"), (1.0, "1.0"), (-1e-5, "-1e-05"), (1.5, "1.5"), (math.inf, "inf")]
    )
    def test_bad_delta(self, acc, delta, shown):
        with pytest.raises(ValueError) as err:
            acc.get_epsilon(Event(*BASE), delta)
        assert f"got {shown}" in str(err.value) and "(0, 1)" in str(err.value)

    def test_nan_delta(self, acc):
        with pytest.raises(ValueError, match="delta must be a number, got nan"):
            acc.get_epsilon(Event(*BASE), math.nan)

    @pytest.mark.parametrize("eps, shown", [(-1.0, "-1.0"), (-1e-9, "-1e-09")])
    def test_bad_epsilon_for_get_delta(self, acc, eps, shown):
        with pytest.raises(ValueError) as err:
            acc.get_delta(Event(*BASE), eps)
        assert f"got {shown}" in str(err.value) and "[0, inf]" in str(err.value)

    @pytest.mark.parametrize("events", ["q=0.1", (0.02, 1.2, 500), 7, None])
    def test_wrong_event_types(self, acc, events):
        with pytest.raises(TypeError):
            acc.get_epsilon(events, DELTA)  # type: ignore[arg-type]

    def test_wrong_delta_and_epsilon_types(self, acc):
        with pytest.raises(TypeError, match="delta must be a real number"):
            acc.get_epsilon(Event(*BASE), "1e-5")  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="epsilon must be a real number"):
            acc.get_delta(Event(*BASE), None)  # type: ignore[arg-type]


# -- registry -----------------------------------------------------------------------------------
def test_unknown_accountant_lists_available_names():
    with pytest.raises(ValueError) as err:
        get_accountant("no-such-accountant")
    message = str(err.value)
    assert "'no-such-accountant'" in message
    for name in ACCOUNTANTS:
        assert name in message


def test_register_accountant_plugs_in_and_refuses_duplicates(monkeypatch):
    monkeypatch.setattr(accountants_base, "_REGISTRY", dict(accountants_base._REGISTRY))

    @register_accountant("constant-test", value=3.0)
    class Constant(Accountant):
        kind = "estimate"

        def __init__(self, value: float) -> None:
            self.value = value

        def _epsilon(self, composition, delta):
            return self.value * composition.steps

        def _delta(self, composition, epsilon):
            return 2.0  # clipped to 1 by the public method

    assert "constant-test" in available_accountants()
    acc = get_accountant("constant-test")
    assert acc.name == "constant-test" and acc.value == 3.0
    assert acc.get_epsilon([Event(0.1, 1.0, 2), Event(0.2, 1.0, 3)], DELTA) == 15.0
    assert acc.get_delta(Event(0.1, 1.0, 2), 1.0) == 1.0
    with pytest.raises(ValueError, match="constant-test.*already registered"):
        register_accountant("constant-test")(Constant)
    with pytest.raises(ValueError, match="already registered"):
        register_accountant("pld")(Constant)


def test_edgeworth_order_is_validated():
    from fedtune.privacy.accountants import EdgeworthAccountant

    with pytest.raises(ValueError, match="order must be 1 or 2, got 3"):
        EdgeworthAccountant(order=3)
    assert get_accountant("edgeworth").order == 2
    assert get_accountant("edgeworth1").order == 1


def test_pld_discretization_is_validated_and_cheap_grid_is_pessimistic(reference_pld_epsilon):
    with pytest.raises(ValueError, match="value_discretization_interval must be > 0, got 0"):
        PLDAccountant(value_discretization_interval=0)
    registered = get_accountant("pld")
    assert registered.value_discretization_interval == 1e-4
    fine = registered.get_epsilon(Event(*BASE), DELTA)
    coarse = reference_pld_epsilon(*BASE, DELTA)  # the 1e-3 grid the other tests use
    # pessimistic discretisation: the coarse grid can only be looser, and only slightly
    assert fine <= coarse <= fine * 1.001
