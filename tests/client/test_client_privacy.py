"""The client's own guard: certified calibration once, spend recorded before replying, refusal past budget."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from fedtune.client.privacy import ClientPrivacy, Plan
from fedtune.privacy import get_accountant
from fedtune.privacy.calibration import certifier
from fedtune.privacy.events import Composition, SubsampledGaussianEvent


def test_calibration_meets_the_budget_over_all_planned_rounds(tmp_path: Path) -> None:
    guard = ClientPrivacy("0", tmp_path, epsilon=3.0, delta=1e-5)
    plan = Plan(sampling_rate=0.05, steps_per_round=20, rounds=4)
    cal = guard.calibrate(plan)
    planned = Composition(tuple(SubsampledGaussianEvent(0.05, cal.sigma, 20) for _ in range(4)))
    assert certifier().get_epsilon(planned, 1e-5) <= 3.0
    assert get_accountant("pld").get_epsilon(planned, 1e-5) > 3.0 * 0.97  # not wastefully large
    again = ClientPrivacy("0", tmp_path, epsilon=3.0, delta=1e-5).calibrate(plan)
    assert again.sigma == cal.sigma  # read back from disk, identical


def test_rounds_are_admitted_until_the_budget_is_spent(tmp_path: Path) -> None:
    guard = ClientPrivacy("7", tmp_path, epsilon=2.0, delta=1e-5)
    plan = Plan(0.1, 10, 3)
    sigma = guard.calibrate(plan).sigma
    event = SubsampledGaussianEvent(0.1, sigma, 10)
    update = {"w": np.ones(3, np.float32)}
    for rnd in (1, 2, 3):
        assert guard.admit(event).allowed
        guard.record(rnd, event, 100, update)
    verdict = guard.admit(event)
    assert not verdict.allowed and "'7'" in verdict.reason and "budget 2" in verdict.reason
    # a restarted client reads its own ledger and still refuses
    restarted = ClientPrivacy("7", tmp_path, epsilon=2.0, delta=1e-5)
    assert restarted.paid_for(2) and not restarted.admit(event).allowed
    np.testing.assert_array_equal(restarted.paid_update(2)["w"], update["w"])
    assert restarted.paid_update(4) is None


def test_non_private_client(tmp_path: Path) -> None:
    guard = ClientPrivacy("1", tmp_path, epsilon=math.inf, delta=1e-5)
    assert not guard.private
