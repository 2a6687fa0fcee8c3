"""Fixtures shared by the privacy tests.

Speed: dp_accounting's PLD at its default discretisation (1e-4) costs 0.3-1.5 s per query, so the
tests use a 1e-3 grid (still a certified, pessimistic upper bound, within ~0.05% of the fine one: see
test_pld_discretization_is_validated_and_cheap_grid_is_pessimistic) and cache the reference values
per cell for the whole session.
"""

from __future__ import annotations

import functools

import pytest

from fedtune.privacy.accountants import Accountant, PLDAccountant, get_accountant
from fedtune.privacy.events import SubsampledGaussianEvent

CHEAP_PLD_INTERVAL = 1e-3


def cheap_pld() -> PLDAccountant:
    """A fast PLD accountant (pessimistic discretisation 1e-3: still a certified upper bound)."""
    acc = PLDAccountant(value_discretization_interval=CHEAP_PLD_INTERVAL)
    acc.name = "pld"  # type: ignore[misc]
    return acc


def accountant_for_tests(name: str) -> Accountant:
    """The registered accountant ``name``; for ``pld`` the same class on the cheaper grid."""
    return cheap_pld() if name == "pld" else get_accountant(name)


@functools.cache
def _reference_pld_epsilon(q: float, sigma: float, steps: int, delta: float) -> float:
    return cheap_pld().get_epsilon(SubsampledGaussianEvent(q, sigma, steps), delta)


@pytest.fixture(scope="session")
def reference_pld_epsilon():
    """``f(q, sigma, steps, delta)``: certified dp_accounting PLD epsilon (1e-3 grid), cached per cell."""
    return _reference_pld_epsilon


@pytest.fixture
def make_accountant():
    """``f(name)``: a fresh accountant for the contract tests (cheap grid for ``pld``)."""
    return accountant_for_tests
