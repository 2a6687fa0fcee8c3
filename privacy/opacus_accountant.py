"""An Opacus accountant backed by fedtune's accountants, so ``PrivacyEngine`` tracks DP-SGD with them.

Usage::

    from fedtune.privacy.opacus_accountant import register_with_opacus
    register_with_opacus()                      # adds "edgeworth", "saddlepoint", "pld" to Opacus
    engine = opacus.PrivacyEngine(accountant="saddlepoint")

The history format is Opacus' own ``[(noise_multiplier, sample_rate, steps), ...]``, so Opacus'
``get_noise_multiplier`` and ``make_private_with_epsilon`` work unchanged.
"""

from __future__ import annotations

from typing import ClassVar

from opacus.accountants import IAccountant, create_accountant, register_accountant

from fedtune.privacy.accountants import get_accountant
from fedtune.privacy.events import Composition, SubsampledGaussianEvent

__all__ = [
    "FedtuneOpacusAccountant",
    "EdgeworthOpacusAccountant",
    "SaddlePointOpacusAccountant",
    "PLDOpacusAccountant",
    "register_with_opacus",
]


class FedtuneOpacusAccountant(IAccountant):
    """Opacus ``IAccountant`` delegating to a fedtune accountant (``fedtune_name``)."""

    fedtune_name: ClassVar[str] = "saddlepoint"

    def __init__(self) -> None:
        super().__init__()
        self._accountant = get_accountant(self.fedtune_name)

    def step(self, *, noise_multiplier: float, sample_rate: float) -> None:
        """Record one DP-SGD step (merged with the previous entry when ``(sigma, q)`` is unchanged)."""
        if self.history and self.history[-1][:2] == (noise_multiplier, sample_rate):
            sigma, q, steps = self.history[-1]
            self.history[-1] = (sigma, q, steps + 1)
        else:
            self.history.append((noise_multiplier, sample_rate, 1))

    def composition(self) -> Composition:
        """The recorded steps as fedtune events (for a ledger or another accountant)."""
        return Composition(tuple(SubsampledGaussianEvent(q, sigma, int(steps)) for sigma, q, steps in self.history))

    def get_epsilon(self, delta: float, *args: object, **kwargs: object) -> float:
        """Epsilon spent so far at ``delta`` (0 before the first step)."""
        if not self.history:
            return 0.0
        return self._accountant.get_epsilon(self.composition(), delta)

    def __len__(self) -> int:
        return len(self.history)

    @classmethod
    def mechanism(cls) -> str:
        return cls.fedtune_name


class EdgeworthOpacusAccountant(FedtuneOpacusAccountant):
    """Second-order Edgeworth accountant (an estimate) for Opacus."""

    fedtune_name = "edgeworth"


class SaddlePointOpacusAccountant(FedtuneOpacusAccountant):
    """Saddle-point (tilted Edgeworth) accountant (an estimate) for Opacus."""

    fedtune_name = "saddlepoint"


class PLDOpacusAccountant(FedtuneOpacusAccountant):
    """dp_accounting PLD accountant (certified upper bound) for Opacus."""

    fedtune_name = "pld"


def register_with_opacus() -> None:
    """Register the fedtune accountants in Opacus' registry (idempotent; Opacus' public API only).

    Raises
    ------
    ValueError
        If another accountant is already registered under one of the names.
    """
    for cls in (EdgeworthOpacusAccountant, SaddlePointOpacusAccountant, PLDOpacusAccountant):
        try:
            existing = create_accountant(cls.fedtune_name)
        except ValueError:  # not registered yet
            register_accountant(cls.fedtune_name, cls)
            continue
        if type(existing) is not cls:
            raise ValueError(
                f"Opacus already has an accountant named {cls.fedtune_name!r} ({type(existing).__name__}); "
                "fedtune will not replace it"
            )
