"""Noise calibration (fedtune.privacy.calibration): smallest sigma, certified by pld-fast."""

from __future__ import annotations

import math

import pytest

from fedtune.privacy.accountants import Accountant, FastPLDAccountant, PLDAccountant, get_accountant
from fedtune.privacy.accountants import fast_pld as fp
from fedtune.privacy.calibration import Calibration, calibrate_noise, certifier, smallest_sigma
from fedtune.privacy.events import Composition
from fedtune.privacy.events import SubsampledGaussianEvent as Event

DELTA = 1e-5


def pld_epsilon(events, delta=DELTA) -> float:
    """The certifier's own bound (pld-fast: connect-the-dots PLD on a loss-scaled grid), recomputed."""
    return certifier().get_epsilon(events, delta)


def test_certifier_is_a_pld_upper_bound():
    cert = certifier()
    assert isinstance(cert, FastPLDAccountant)
    assert cert.kind == "upper-bound" and cert.name == "pld-fast"
    fine = PLDAccountant(1e-4).get_epsilon(Event(0.01, 1.0, 1000), DELTA)
    coarse = PLDAccountant(1e-3).get_epsilon(Event(0.01, 1.0, 1000), DELTA)
    # within 0.5% of the 1e-4 grid, and not far from the 1e-3 grid (pld-fast's step here is 1.3e-3)
    assert fine <= cert.get_epsilon(Event(0.01, 1.0, 1000), DELTA) <= min(coarse * 1.001, fine * 1.005)


def test_calibrated_sigma_is_certified_and_tight():
    cal = calibrate_noise(2.0, DELTA, 0.02, 500)
    assert isinstance(cal, Calibration)
    assert cal.certified and cal.accountant == "saddlepoint" and cal.certifier == "pld-fast"
    assert (cal.target_epsilon, cal.delta, cal.sampling_rate, cal.steps) == (2.0, DELTA, 0.02, 500)
    # certified: an independent query at the returned sigma meets the target
    assert pld_epsilon(Event(0.02, cal.sigma, 500)) <= 2.0
    assert cal.certified_epsilon == pytest.approx(pld_epsilon(Event(0.02, cal.sigma, 500)), rel=1e-12)
    # tight on the certified bound: 0.05% less noise misses it
    assert pld_epsilon(Event(0.02, cal.sigma * 0.9995, 500)) > 2.0
    # the estimate at sigma is reported, and within 1% of the target
    sp = get_accountant("saddlepoint")
    assert cal.epsilon_estimate == pytest.approx(sp.get_epsilon(Event(0.02, cal.sigma, 500), DELTA), rel=1e-12)
    assert cal.epsilon_estimate == pytest.approx(2.0, rel=0.01)
    assert sp.get_epsilon(Event(0.02, cal.sigma_estimate * 0.999, 500), DELTA) > 2.0
    assert cal.sigma == pytest.approx(cal.sigma_estimate, rel=0.01)
    assert set(cal.to_dict()) >= {"sigma", "sigma_estimate", "epsilon_estimate", "certified_epsilon", "certified"}


def _reference_smallest_sigma(target: float, q: float, steps: int, lo: float, hi: float) -> float:
    """Independent bisection in log sigma on dp_accounting's PLD (grid <= 1e-4 and 4x finer than pld-fast's).

    Needs ``eps(lo) > target >= eps(hi)``; returns the upper end of a bracket of relative width 1e-5.
    """

    def eps(sigma: float) -> float:
        step = min(1e-4, fp.grid_step((((q, sigma), steps),)) / 4)
        return PLDAccountant(value_discretization_interval=step).get_epsilon(Event(q, sigma, steps), DELTA)

    assert eps(lo) > target >= eps(hi), "the bracket does not hold the reference's smallest sigma"
    while hi / lo > 1 + 1e-5:
        mid = math.sqrt(lo * hi)
        lo, hi = (lo, mid) if eps(mid) <= target else (mid, hi)
    return hi


@pytest.mark.parametrize(
    "target, q, steps",
    [(1.0, 0.02, 2000), (3.0, 0.03, 660)],
    ids=["issue-12-cell", "centralized-sst2"],
)
def test_certified_sigma_within_half_a_percent_of_the_smallest(target, q, steps):
    cal = calibrate_noise(target, DELTA, q, steps)
    # the bracket [0.995 sigma, sigma] holds the reference's smallest sigma: sigma certifies under the
    # reference (pld-fast is an upper bound of it), and 0.5% less noise does not
    smallest = _reference_smallest_sigma(target, q, steps, cal.sigma * 0.995, cal.sigma)
    assert smallest <= cal.sigma <= smallest * 1.005
    assert cal.sigma / smallest - 1 < 0.002  # measured +0.08% and +0.05% (docs/benchmarks.md, issue 12)


def test_calibration_lowers_sigma_when_the_estimate_overstates():
    # at epsilon 1, q 0.02, 2000 steps the saddle point asks for 0.8% more noise than needed; before
    # issue 12 calibration only ever raised sigma from there (+0.87% against the smallest sigma)
    cal = calibrate_noise(1.0, DELTA, 0.02, 2000)
    assert cal.sigma < cal.sigma_estimate * 0.995
    assert cal.certified and cal.certified_epsilon <= 1.0
    assert cal.certified_epsilon == pytest.approx(1.0, rel=1e-3)
    assert cal.epsilon_estimate > 1.0  # the estimate at the certified sigma overstates: it is an estimate


def test_calibration_beyond_sigma_two():
    cal = calibrate_noise(0.5, DELTA, 0.03, 660)
    assert cal.sigma > 2.0
    assert cal.certified and cal.certified_epsilon <= 0.5
    assert pld_epsilon(Event(0.03, cal.sigma, 660)) <= 0.5
    # the saddle point overstates epsilon here: the certified search lowers sigma (by 2%)
    assert cal.sigma < cal.sigma_estimate
    sp = get_accountant("saddlepoint")
    assert sp.get_epsilon(Event(0.03, cal.sigma_estimate, 660), DELTA) == pytest.approx(0.5, rel=0.01)


def test_calibration_for_a_tiny_epsilon():
    cal = calibrate_noise(0.05, DELTA, 0.01, 100)
    assert cal.sigma > 5.0
    assert cal.certified and pld_epsilon(Event(0.01, cal.sigma, 100)) <= 0.05
    assert cal.epsilon_estimate == pytest.approx(0.05, rel=0.01)


def test_spent_budget_is_composed():
    spent = Composition((Event(0.02, 1.0, 200),))
    fresh = calibrate_noise(2.0, DELTA, 0.02, 500)
    rest = calibrate_noise(2.0, DELTA, 0.02, 500, spent=spent)
    assert rest.sigma > fresh.sigma * 1.1
    # the whole history (spent + planned) meets the target, not just the planned part
    total = spent + Event(0.02, rest.sigma, 500)
    assert pld_epsilon(total) <= 2.0
    assert rest.certified_epsilon == pytest.approx(pld_epsilon(total), rel=1e-12)
    assert get_accountant("saddlepoint").get_epsilon(total, DELTA) == pytest.approx(2.0, rel=0.01)


def test_certification_raises_sigma_when_the_estimate_understates():
    # edgeworth1 is below pld at q = 0.01, sigma ~ 0.8, 1000 steps: its sigma is not enough
    cal = calibrate_noise(3.0, DELTA, 0.01, 1000, accountant="edgeworth1")
    assert cal.accountant == "edgeworth1"
    assert pld_epsilon(Event(0.01, cal.sigma_estimate, 1000)) > 3.0  # the premise: edgeworth1 under-states
    assert cal.sigma > cal.sigma_estimate
    assert cal.certified and cal.certified_epsilon <= 3.0
    assert pld_epsilon(Event(0.01, cal.sigma, 1000)) <= 3.0
    # the estimate at the certified sigma is below the target (the accountant asked for less noise)
    assert cal.epsilon_estimate < 3.0
    # and certification does not overshoot: 1% less noise misses the certified target
    assert pld_epsilon(Event(0.01, cal.sigma * 0.99, 1000)) > 3.0


def test_without_certification():
    cal = calibrate_noise(2.0, DELTA, 0.02, 500, certify=False)
    assert not cal.certified
    assert cal.certified_epsilon is None and cal.certifier is None
    assert cal.sigma == cal.sigma_estimate
    assert cal.epsilon_estimate == pytest.approx(2.0, rel=0.01)


@pytest.mark.parametrize("growth", [1.01, 2.0])
def test_smallest_sigma_for_pld_is_the_boundary_whatever_the_first_step(growth):
    pld = PLDAccountant(value_discretization_interval=1e-3)
    sigma = smallest_sigma(pld, 2.0, DELTA, 0.02, 500, start=1.2, growth=growth)
    assert pld.get_epsilon(Event(0.02, sigma, 500), DELTA) <= 2.0
    assert pld.get_epsilon(Event(0.02, sigma * 0.999, 500), DELTA) > 2.0


class _Toy(Accountant):
    """epsilon = a / sigma + (steps of other mechanisms): monotone, instant, exact root a / target."""

    kind = "estimate"
    name = "toy"

    def __init__(self, a: float) -> None:
        self.a = a
        self.calls = 0

    def _epsilon(self, composition, delta):
        self.calls += 1
        planned_sigma = composition.events[-1].noise_multiplier
        return self.a / planned_sigma + 0.1 * (len(composition.events) - 1)

    def _delta(self, composition, epsilon):  # pragma: no cover - not used
        raise NotImplementedError


@pytest.mark.parametrize("a, start", [(1.0, 1.0), (50.0, 1.0), (1e-3, 1.0), (7.0, 1000.0), (7.0, 1e-3)])
def test_smallest_sigma_brackets_in_both_directions(a, start):
    sigma = smallest_sigma(_Toy(a), 0.5, DELTA, 0.1, 10, start=start)
    exact = a / 0.5
    assert exact <= sigma <= exact * (1 + 2e-4)  # on the safe side, within rtol


def test_smallest_sigma_refuses_a_growth_of_one():
    with pytest.raises(ValueError, match="growth must be > 1, got 1.0"):
        smallest_sigma(_Toy(1.0), 0.5, DELTA, 0.1, 10, growth=1.0)


@pytest.mark.parametrize("a, start", [(1.0, 1.0), (50.0, 1.0), (7.0, 1e-3)])
def test_small_first_step_still_brackets_far_roots(a, start):
    toy = _Toy(a)
    sigma = smallest_sigma(toy, 0.5, DELTA, 0.1, 10, start=start, growth=1.01)
    assert a / 0.5 <= sigma <= a / 0.5 * (1 + 2e-4)


def test_smallest_sigma_counts_spent_events():
    spent = Composition((Event(0.1, 1.0, 10), Event(0.1, 2.0, 10)))
    sigma = smallest_sigma(_Toy(1.0), 0.5, DELTA, 0.1, 10, spent=spent)
    assert sigma == pytest.approx(1.0 / 0.3, rel=2e-4)


def test_smallest_sigma_reports_an_unreachable_target():
    spent = Composition(tuple(Event(0.1, 1.0, 1) for _ in range(10)))  # already 1.0 > 0.5
    with pytest.raises(ValueError, match=r"no noise multiplier up to .* meets epsilon = 0.5 .*already spent"):
        smallest_sigma(_Toy(1.0), 0.5, DELTA, 0.1, 10, spent=spent)


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        (dict(target_epsilon=math.inf), r"epsilon = inf needs no noise"),
        (dict(target_epsilon=0.0), r"epsilon must be in \(0, inf\], got 0.0"),
        (dict(target_epsilon=-1.0), r"epsilon must be in \(0, inf\], got -1.0"),
        (dict(delta=0.0), r"delta must be in \(0, 1\), got 0.0"),
        (dict(delta=1.5), r"delta must be in \(0, 1\), got 1.5"),
        (dict(sampling_rate=1.5), r"sampling_rate q must be in \(0, 1\], got 1.5"),
        (dict(sampling_rate=0.0), r"sampling_rate q must be in \(0, 1\], got 0.0"),
        (dict(steps=0), r"steps must be >= 1, got 0"),
        (dict(accountant="nope"), r"unknown accountant 'nope'; available: .*saddlepoint"),
    ],
)
def test_bad_input_names_the_value(kwargs, pattern):
    args = dict(target_epsilon=2.0, delta=DELTA, sampling_rate=0.02, steps=500) | kwargs
    with pytest.raises(ValueError, match=pattern):
        calibrate_noise(**args)


def test_non_integer_steps_is_a_type_error():
    with pytest.raises(TypeError, match="steps must be an integer, got 2.5"):
        calibrate_noise(2.0, DELTA, 0.02, 2.5)  # type: ignore[arg-type]
