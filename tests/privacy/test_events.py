"""Privacy events: validation, normalisation and round trips (fedtune.privacy.events)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from fedtune.privacy.events import (
    Composition,
    SubsampledGaussianEvent,
    as_composition,
    check_delta,
    check_epsilon,
)


class TestSubsampledGaussianEvent:
    def test_fields_are_normalised_to_python_types(self):
        ev = SubsampledGaussianEvent(1, np.float32(0.75), np.int64(12))
        assert ev.sampling_rate == 1.0 and type(ev.sampling_rate) is float
        assert ev.noise_multiplier == 0.75 and type(ev.noise_multiplier) is float
        assert ev.steps == 12 and type(ev.steps) is int
        assert ev.mechanism == (1.0, 0.75)

    def test_default_is_one_step(self):
        assert SubsampledGaussianEvent(0.1, 1.0).steps == 1

    @pytest.mark.parametrize("q", [0.0, -0.1, 1.5, 1.0000001, math.inf])
    def test_bad_sampling_rate_names_value_and_range(self, q):
        with pytest.raises(ValueError, match=r"sampling_rate q must be in \(0, 1\], got " + repr(q)):
            SubsampledGaussianEvent(q, 1.0, 10)

    @pytest.mark.parametrize("sigma", [0.0, -1.0, math.inf])
    def test_bad_noise_multiplier_names_value_and_range(self, sigma):
        with pytest.raises(ValueError, match=r"noise_multiplier sigma must be in \(0, inf\), got " + repr(sigma)):
            SubsampledGaussianEvent(0.1, sigma, 10)

    @pytest.mark.parametrize("field, args", [("sampling_rate", (math.nan, 1.0)), ("noise_multiplier", (0.1, math.nan))])
    def test_nan_is_refused(self, field, args):
        with pytest.raises(ValueError, match=f"{field} must be a number, got nan"):
            SubsampledGaussianEvent(*args)

    @pytest.mark.parametrize("steps", [0, -3])
    def test_bad_steps_value(self, steps):
        with pytest.raises(ValueError, match=f"steps must be >= 1, got {steps}"):
            SubsampledGaussianEvent(0.1, 1.0, steps)

    @pytest.mark.parametrize("steps", [2.5, 10.0, "10", True])
    def test_non_integer_steps_is_a_type_error(self, steps):
        with pytest.raises(TypeError, match=r"steps must be an integer, got " + repr(steps).replace(".", r"\.")):
            SubsampledGaussianEvent(0.1, 1.0, steps)

    @pytest.mark.parametrize("args", [("0.1", 1.0), (0.1, "1"), (True, 1.0), (0.1, None)])
    def test_non_real_parameters_are_type_errors(self, args):
        with pytest.raises(TypeError, match="must be a real number"):
            SubsampledGaussianEvent(*args)

    def test_frozen(self):
        ev = SubsampledGaussianEvent(0.1, 1.0, 3)
        with pytest.raises(dataclasses.FrozenInstanceError):
            ev.steps = 4  # type: ignore[misc]

    def test_repeated_multiplies_steps(self):
        ev = SubsampledGaussianEvent(0.02, 1.3, 7).repeated(3)
        assert ev == SubsampledGaussianEvent(0.02, 1.3, 21)

    def test_dict_round_trip_is_exact(self):
        ev = SubsampledGaussianEvent(0.0123456789, 1.23456789, 4321)
        data = ev.to_dict()
        assert data == {"sampling_rate": 0.0123456789, "noise_multiplier": 1.23456789, "steps": 4321}
        assert SubsampledGaussianEvent.from_dict(data) == ev

    def test_from_dict_missing_field_names_it(self):
        with pytest.raises(ValueError, match="missing the field 'steps'"):
            SubsampledGaussianEvent.from_dict({"sampling_rate": 0.1, "noise_multiplier": 1.0})

    def test_from_dict_validates(self):
        with pytest.raises(ValueError, match="got 2.0"):
            SubsampledGaussianEvent.from_dict({"sampling_rate": 2.0, "noise_multiplier": 1.0, "steps": 1})


class TestComposition:
    def test_empty_is_refused(self):
        with pytest.raises(ValueError, match="at least one event"):
            Composition(())

    def test_non_event_is_a_type_error(self):
        with pytest.raises(TypeError, match="SubsampledGaussianEvent"):
            Composition((SubsampledGaussianEvent(0.1, 1.0), (0.1, 1.0, 3)))  # type: ignore[arg-type]

    def test_list_is_stored_as_tuple(self):
        comp = Composition([SubsampledGaussianEvent(0.1, 1.0)])  # type: ignore[arg-type]
        assert isinstance(comp.events, tuple)

    def test_steps_and_grouping(self):
        a = SubsampledGaussianEvent(0.01, 1.0, 100)
        b = SubsampledGaussianEvent(0.02, 1.0, 50)
        comp = Composition((a, b, a, SubsampledGaussianEvent(0.01, 1.0, 5)))
        assert comp.steps == 255
        assert comp.grouped() == {(0.01, 1.0): 205, (0.02, 1.0): 50}

    def test_add(self):
        a = SubsampledGaussianEvent(0.01, 1.0, 100)
        b = SubsampledGaussianEvent(0.02, 1.0, 50)
        assert (Composition((a,)) + b).events == (a, b)
        assert (Composition((a,)) + Composition((b, a))).events == (a, b, a)
        with pytest.raises(TypeError):
            Composition((a,)) + 3  # type: ignore[operator]


class TestAsComposition:
    def test_variants(self):
        a = SubsampledGaussianEvent(0.01, 1.0, 100)
        comp = Composition((a,))
        assert as_composition(comp) is comp
        assert as_composition(a) == comp
        assert as_composition([a, a]).events == (a, a)
        assert as_composition(e for e in (a,)) == comp

    @pytest.mark.parametrize("bad", ["events", b"x", 3, None])
    def test_non_events_are_type_errors(self, bad):
        with pytest.raises(TypeError, match="expected a privacy event"):
            as_composition(bad)  # type: ignore[arg-type]

    def test_empty_iterable_is_a_value_error(self):
        with pytest.raises(ValueError, match="at least one event"):
            as_composition([])


class TestChecks:
    @pytest.mark.parametrize("delta", [1e-12, 1e-5, 0.5, 0.999999])
    def test_good_delta(self, delta):
        assert check_delta(delta) == delta

    @pytest.mark.parametrize("delta", [0.0, 1.0, -1e-5, 2.0, math.inf])
    def test_bad_delta_names_value_and_range(self, delta):
        with pytest.raises(ValueError, match=r"delta must be in \(0, 1\), got " + repr(delta)):
            check_delta(delta)

    def test_delta_type(self):
        with pytest.raises(TypeError, match="delta must be a real number"):
            check_delta("1e-5")

    def test_epsilon(self):
        assert check_epsilon(2) == 2.0
        assert check_epsilon(math.inf) == math.inf
        assert check_epsilon(0.0, allow_zero=True) == 0.0
        with pytest.raises(ValueError, match=r"epsilon must be in \(0, inf\], got 0.0"):
            check_epsilon(0.0)
        with pytest.raises(ValueError, match=r"epsilon must be in \[0, inf\], got -1"):
            check_epsilon(-1, allow_zero=True)
        with pytest.raises(ValueError, match="got nan"):
            check_epsilon(math.nan)
        with pytest.raises(TypeError):
            check_epsilon(None)
