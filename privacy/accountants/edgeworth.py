r"""The Edgeworth accountant (Wang et al. 2022, arXiv 2206.04236), as used by EW-Tune
(Behnia et al. 2022, arXiv 2210.15042).

The privacy loss of ``T`` composed steps is a sum, so its cumulants are sums of per-step cumulants
(exact for heterogeneous compositions). With :math:`\kappa_j` the total cumulants, the Edgeworth
expansion of the survival function of the standardised loss :math:`z = (x - \kappa_1)/\sqrt{\kappa_2}` is

.. math::
   S(x) \approx 1 - \Phi(z) + \varphi(z)\Big[\tfrac{\lambda_3}{6} He_2(z)\Big]
        + \varphi(z)\Big[\tfrac{\lambda_4}{24} He_3(z) + \tfrac{\lambda_3^2}{72} He_5(z)\Big],

with :math:`\lambda_j = \kappa_j/\kappa_2^{j/2}`; the first bracket is order 1, both are order 2.
For one neighbouring direction with loss ``L`` under ``P`` and under ``Q``,

.. math::  \delta(\varepsilon) = S_P(\varepsilon) - e^{\varepsilon} S_Q(\varepsilon),

and fedtune takes the worse of the remove (``P`` vs ``Q``) and add (``Q`` vs ``P``) directions.

This is an *approximation*, not a bound: in the far tail (``delta = 1e-5``, small ``sigma``) the
expansion can understate epsilon. fedtune therefore certifies every epsilon it enforces with the
``pld`` accountant (see :mod:`fedtune.privacy.calibration`).
"""

from __future__ import annotations

import math

import numpy as np
from scipy.special import erfcx, ndtr

from fedtune.privacy.accountants._search import last_crossing
from fedtune.privacy.accountants.base import Accountant, AccountingError, register_accountant
from fedtune.privacy.events import Composition
from fedtune.privacy.plrv import plrv_for

__all__ = ["EdgeworthAccountant", "survival_edgeworth"]

_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


def survival_edgeworth(x: np.ndarray, kappa: np.ndarray, order: int, log_scale: np.ndarray | float = 0.0) -> np.ndarray:
    """``exp(log_scale) * S(x)`` for the Edgeworth survival function with cumulants ``kappa[1:5]``.

    Computed through the Mills ratio so that ``e^eps * S_Q(eps)`` neither overflows nor underflows.
    """
    x = np.asarray(x, dtype=float)
    k1, k2, k3, k4 = kappa[1], kappa[2], kappa[3], kappa[4]
    z = (x - k1) / math.sqrt(k2)
    lam3 = k3 / k2**1.5
    poly = lam3 / 6.0 * (z * z - 1.0)
    if order >= 2:
        lam4 = k4 / k2**2
        z2 = z * z
        poly = poly + lam4 / 24.0 * z * (z2 - 3.0) + lam3**2 / 72.0 * z * (z2 * z2 - 10.0 * z2 + 15.0)
    log_phi = -0.5 * z * z - _LOG_SQRT_2PI + log_scale
    positive = z >= 0
    mills = np.where(positive, math.sqrt(math.pi / 2.0) * erfcx(np.where(positive, z, 0.0) / math.sqrt(2.0)), 0.0)
    head = np.where(positive, 0.0, np.exp(log_scale) * ndtr(-np.where(positive, 0.0, z)))
    return head + np.exp(log_phi) * (mills + poly)


@register_accountant("edgeworth", order=2)
@register_accountant("edgeworth1", order=1)
class EdgeworthAccountant(Accountant):
    """Edgeworth accountant of order 1 or 2 (registered as ``edgeworth1`` and ``edgeworth``).

    Parameters
    ----------
    order : {1, 2}
        Expansion order (2 uses the fourth cumulant and the squared skewness term).

    Notes
    -----
    Per-step cumulants are cached per ``(q, sigma)`` (:func:`fedtune.privacy.plrv.plrv_for`), so a
    query costs the same for 10 or 10,000 steps. The epsilon root search is bracketed and scans for
    every crossing; it returns the largest (conservative) one.
    """

    kind = "estimate"

    def __init__(self, order: int = 2) -> None:
        if order not in (1, 2):
            raise ValueError(f"Edgeworth order must be 1 or 2, got {order!r}")
        self.order = order

    @staticmethod
    def _cumulants(composition: Composition) -> tuple[np.ndarray, np.ndarray]:
        """Total cumulants of the loss under ``P`` (t = 0) and under ``Q`` (t = -1)."""
        under_p = np.zeros(5)
        under_q = np.zeros(5)
        for (q, sigma), steps in composition.grouped().items():
            plrv = plrv_for(q, sigma)
            under_p += steps * plrv.cumulants(0.0)
            under_q += steps * plrv.cumulants(-1.0)
        return under_p, under_q

    def _delta_curve(self, composition: Composition):  # type: ignore[no-untyped-def]
        under_p, under_q = self._cumulants(composition)
        flip = np.array([1.0, -1.0, 1.0, -1.0, 1.0])
        # (first measure, second measure) for remove and for add (loss -L, cumulants sign-flipped)
        directions = ((under_p, under_q), (flip * under_q, flip * under_p))
        order = self.order

        def delta(eps: np.ndarray | float) -> np.ndarray:
            eps = np.asarray(eps, dtype=float)
            out = np.full(eps.shape, -np.inf)
            for first, second in directions:
                d = survival_edgeworth(eps, first, order) - survival_edgeworth(eps, second, order, log_scale=eps)
                out = np.maximum(out, d)
            return out

        scale = math.sqrt(max(under_p[2], under_q[2]))
        guess = max(under_p[1], -under_q[1], 0.0) + 8.0 * scale + 1e-3
        return delta, guess

    def _epsilon(self, composition: Composition, delta: float) -> float:
        curve, guess = self._delta_curve(composition)
        crossing = last_crossing(lambda e: float(curve(e)), delta, 0.0, guess, what="Edgeworth epsilon")
        if crossing is not None:
            return crossing.x
        if all(q == 1.0 for q, _ in composition.grouped()):
            return 0.0  # exact for the Gaussian mechanism: delta(0) really is below the target
        raise AccountingError(
            f"the order-{self.order} Edgeworth expansion puts delta(0) = {float(curve(0.0)):.3g} at or below "
            f"delta = {delta:g}, which the subsampled mechanism does not satisfy: no trustworthy epsilon here"
        )

    def _delta(self, composition: Composition, epsilon: float) -> float:
        curve, _ = self._delta_curve(composition)
        return float(curve(epsilon))
