"""Reference accountants from well-kept libraries: ``rdp`` and ``prv`` (Opacus), ``pld`` (dp_accounting).

``pld`` is fedtune's certified reference: dp_accounting's privacy loss distribution accountant
(Koskela et al. 2020; Doroshenko et al. 2022, arXiv 2207.04380) with pessimistic discretisation,
both neighbouring directions. fedtune certifies with ``pld-fast`` (:func:`certifier`,
:mod:`fedtune.privacy.accountants.fast_pld`): the same algorithm, vectorised, on a loss-scaled grid.
``rdp`` is a certified but looser bound (Mironov et al. 2019, with the RDP-to-DP conversion of Balle
et al. 2020). ``prv`` is Opacus' PRV accountant (Gopi et al. 2021); it
models only the remove direction, so fedtune labels it an estimate.
"""

from __future__ import annotations

import math

import numpy as np

from fedtune.privacy.accountants.base import Accountant, register_accountant
from fedtune.privacy.events import Composition

__all__ = [
    "PLDAccountant",
    "RDPAccountant",
    "PRVAccountant",
    "RDP_ORDERS",
    "certifier",
    "CERTIFIER_DISCRETIZATION",
    "AdaptivePLDAccountant",
]

#: Coarsest loss grid of the certifying PLD accountant. The pessimistic bound is certified at any
#: step, but its slack grows with the step and the number of compositions, so the certifier refines
#: the step in proportion to epsilon (see :class:`AdaptivePLDAccountant`).
CERTIFIER_DISCRETIZATION = 1e-3

#: Opacus' default orders, extended upward so that strong-privacy regimes are not cut off.
RDP_ORDERS: tuple[float, ...] = tuple(
    [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)) + [64, 80, 96, 128, 192, 256, 384, 512, 768, 1024]
)


@register_accountant("pld")
class PLDAccountant(Accountant):
    """dp_accounting's PLD accountant: a certified upper bound.

    Parameters
    ----------
    value_discretization_interval : float
        Grid step of the loss discretisation. The bound is certified at any step (pessimistic
        rounding); a smaller step is tighter and slower. Default 1e-4 (dp_accounting's).
    """

    kind = "upper-bound"

    def __init__(self, value_discretization_interval: float = 1e-4) -> None:
        if not value_discretization_interval > 0:
            raise ValueError(f"value_discretization_interval must be > 0, got {value_discretization_interval!r}")
        self.value_discretization_interval = float(value_discretization_interval)

    def _accountant(self, composition: Composition):  # type: ignore[no-untyped-def]
        from dp_accounting.pld import pld_privacy_accountant

        acc = pld_privacy_accountant.PLDAccountant(value_discretization_interval=self.value_discretization_interval)
        acc.compose(to_dp_event(composition))
        return acc

    def _epsilon(self, composition: Composition, delta: float) -> float:
        return float(self._accountant(composition).get_epsilon(delta))

    def _delta(self, composition: Composition, epsilon: float) -> float:
        return float(self._accountant(composition).get_delta(epsilon))


class AdaptivePLDAccountant(PLDAccountant):
    """PLD with a loss grid refined to the size of epsilon: certified and tight (the certifier before issue 12).

    A first pass at step :data:`CERTIFIER_DISCRETIZATION` gives a certified ``eps0``; a second pass at
    step ``clip(eps0 * 1e-4, 2e-5, 1e-3)`` gives a tighter certified value (its slack is then about
    1e-4 relative). Both are upper bounds, so the smaller is returned.
    """

    def __init__(self) -> None:
        super().__init__(CERTIFIER_DISCRETIZATION)

    @staticmethod
    def _step(epsilon: float) -> float:
        """``epsilon * 1e-4`` rounded down to 1, 2 or 5 times a power of ten, within [2e-5, 1e-3]."""
        target = min(CERTIFIER_DISCRETIZATION, max(2e-5, epsilon * 1e-4))
        power = 10.0 ** math.floor(math.log10(target))
        return max(m * power for m in (1.0, 2.0, 5.0) if m * power <= target * (1 + 1e-12))

    def _epsilon(self, composition: Composition, delta: float) -> float:
        coarse = super()._epsilon(composition, delta)
        if not math.isfinite(coarse) or self._step(coarse) >= CERTIFIER_DISCRETIZATION:
            return coarse
        step = self._step(coarse)
        fine = PLDAccountant(step)._epsilon(composition, delta)
        if self._step(fine) != step:  # keep epsilon(delta) and delta(epsilon) on the same grid
            fine = PLDAccountant(self._step(fine))._epsilon(composition, delta)
        return min(coarse, fine)

    def _delta(self, composition: Composition, epsilon: float) -> float:
        return PLDAccountant(self._step(epsilon))._delta(composition, epsilon)


def certifier() -> Accountant:
    """The certifying accountant: ``pld-fast``, a pessimistic connect-the-dots PLD, both directions.

    :class:`~fedtune.privacy.accountants.fast_pld.FastPLDAccountant` (issue 12): a certified upper
    bound within about 0.1% of the fine-grid dp_accounting ``pld`` and 10-100x faster. Before issue 12
    this was :class:`AdaptivePLDAccountant` (dp_accounting on an epsilon-adaptive grid, 0.1-6 s a query),
    which stays available and answers whenever ``pld-fast`` cannot set up its grid.
    """
    from fedtune.privacy.accountants.base import get_accountant

    return get_accountant("pld-fast")


def to_dp_event(composition: Composition):  # type: ignore[no-untyped-def]
    """The equivalent ``dp_accounting.DpEvent`` (for any dp_accounting accountant)."""
    import dp_accounting

    parts = [
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps
        )
        for (q, sigma), steps in composition.grouped().items()
    ]
    return parts[0] if len(parts) == 1 else dp_accounting.ComposedDpEvent(parts)


@register_accountant("rdp")
class RDPAccountant(Accountant):
    """Renyi DP through Opacus' analysis (Mironov et al. 2019): a certified upper bound.

    Parameters
    ----------
    orders : sequence of float
        Renyi orders alpha > 1 to optimise over (default :data:`RDP_ORDERS`).
    """

    kind = "upper-bound"

    def __init__(self, orders: tuple[float, ...] = RDP_ORDERS) -> None:
        self.orders = np.asarray(orders, dtype=float)

    def _rdp(self, composition: Composition) -> np.ndarray:
        from opacus.accountants.analysis import rdp as rdp_analysis

        total = np.zeros_like(self.orders)
        for (q, sigma), steps in composition.grouped().items():
            total += rdp_analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=list(self.orders))
        return total

    def _epsilon(self, composition: Composition, delta: float) -> float:
        from opacus.accountants.analysis import rdp as rdp_analysis

        eps, _ = rdp_analysis.get_privacy_spent(orders=list(self.orders), rdp=list(self._rdp(composition)), delta=delta)
        return max(0.0, float(eps))

    def _delta(self, composition: Composition, epsilon: float) -> float:
        # inverse of Balle et al. 2020, Thm 21: log delta = (a-1)(rdp - eps + log((a-1)/a)) - log a
        a = self.orders
        log_delta = (a - 1.0) * (self._rdp(composition) - epsilon + np.log((a - 1.0) / a)) - np.log(a)
        return float(min(1.0, math.exp(float(np.nanmin(log_delta)))))


@register_accountant("prv")
class PRVAccountant(Accountant):
    """Opacus' PRV accountant (Gopi et al. 2021); an estimate (remove direction only).

    Parameters
    ----------
    eps_error : float
        Target epsilon discretisation error passed to Opacus (default 0.01).
    """

    kind = "estimate"

    def __init__(self, eps_error: float = 0.01) -> None:
        self.eps_error = float(eps_error)

    def _opacus(self, composition: Composition):  # type: ignore[no-untyped-def]
        from opacus.accountants import PRVAccountant as OpacusPRV

        acc = OpacusPRV()
        acc.history = [(sigma, q, steps) for (q, sigma), steps in composition.grouped().items()]
        return acc

    def _epsilon(self, composition: Composition, delta: float) -> float:
        return float(self._opacus(composition).get_epsilon(delta, eps_error=self.eps_error))

    def _delta(self, composition: Composition, epsilon: float) -> float:
        acc = self._opacus(composition)
        dprv = acc._get_dprv(eps_error=self.eps_error, delta_error=1e-10)
        return float(dprv.compute_delta_estimate(epsilon))
