r"""The saddle-point accountant: an exponentially tilted Edgeworth expansion.

Same cumulant machinery as :mod:`~fedtune.privacy.accountants.edgeworth`, expanded at the saddle
point instead of at the mean, so the approximation is accurate in relative terms deep in the tail
where ``delta = 1e-5`` lives (Daniels 1954, 1987; for DP, Alghamdi et al. 2023, arXiv 2208.10422).

For one neighbouring direction with total CGF ``K`` of the loss under the first measure,

.. math::
   \delta(\varepsilon) = E_P\big[(1 - e^{\varepsilon - L})_+\big]
   = \frac{1}{2\pi i}\int_{\hat s - i\infty}^{\hat s + i\infty} e^{K(s) - s\varepsilon}\,
     \frac{ds}{s(s+1)},\qquad K'(\hat s) = \varepsilon .

Expanding ``K`` around the saddle point :math:`\hat s` to fourth order, with the pole at ``s = 0``
treated uniformly (Lugannani & Rice 1980) and :math:`h(s) = 1/(s(s+1))`, gives

.. math::
   \delta \approx Q(\hat w) - \varphi(\hat w)\Big(\frac{1}{\hat w} - \frac{1}{\hat w^3}\Big)
   + \frac{\varphi(\hat w)}{\sqrt{K_2}}\Big[h\Big(1 + \frac{\lambda_4}{8} - \frac{5\lambda_3^2}{24}\Big)
   + \frac{h' K_3}{2K_2^2} - \frac{h''}{2K_2}\Big],

where :math:`\hat w = \operatorname{sign}(\hat s)\sqrt{2(\hat s\varepsilon - K(\hat s))}`,
:math:`K_j = K^{(j)}(\hat s)`, :math:`\lambda_j = K_j/K_2^{j/2}`, and ``h`` and its derivatives are
taken at :math:`\hat s`. The error is of relative order ``1/T^2``.

For ``epsilon(delta)`` the search runs over :math:`\hat s` (``delta`` is monotone in it and
``epsilon = K'(s)``), so no nested root search is needed. Still an *estimate*: no certified error
bound is claimed.
"""

from __future__ import annotations

import logging
import math

import numpy as np
from scipy.special import erfcx, ndtr

from fedtune.privacy.accountants._search import increasing_root, last_crossing
from fedtune.privacy.accountants.base import Accountant, AccountingError, register_accountant
from fedtune.privacy.accountants.reference import certifier
from fedtune.privacy.events import Composition
from fedtune.privacy.plrv import plrv_for

__all__ = ["SaddlePointAccountant"]

log = logging.getLogger(__name__)

_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)
_FLIP = np.array([1.0, -1.0, 1.0, -1.0, 1.0])
#: Below this many expected tilted inclusions the expansion is not trusted (measured: see
#: docs/benchmarks.md); the accountant then answers with the certifier's value (``pld-fast``) instead.
MIN_TILTED_INCLUSIONS = 8.0
#: Nor when its O(1/T) correction exceeds this fraction of the leading term.
MAX_RELATIVE_CORRECTION = 0.3
_W_MIN = 0.05  # |w| below this, the uniform terms cancel catastrophically in floating point


def _s_min(composition: Composition) -> float:
    """Smallest ``|s|`` used: where ``|w| ~ s sqrt(K'') = _W_MIN`` (``delta`` is ~0.3 there)."""
    return _W_MIN / math.sqrt(max(_tilted_cgf(composition, 0.0)[2], _tilted_cgf(composition, -1.0)[2]))


def _tilted_cgf(composition: Composition, t: float) -> np.ndarray:
    """``[K, K', K'', K''', K'''']`` of the total loss at tilt ``t`` (sum over events)."""
    total = np.zeros(5)
    for (q, sigma), steps in composition.grouped().items():
        total += steps * plrv_for(q, sigma).cgf_derivatives(t)
    return total


def _direction_cgf(composition: Composition, s: float, direction: int) -> np.ndarray:
    """CGF derivatives for the remove (0) or the add (1) direction at saddle variable ``s``."""
    if direction == 0:
        return _tilted_cgf(composition, s)
    return _FLIP * _tilted_cgf(composition, -s - 1.0)


class _Breakdown(ArithmeticError):
    """The expansion produced a non-positive delta: it is outside its domain of validity."""


def _tilted_inclusions(composition: Composition, s: float) -> float:
    r"""Expected number of steps that include the record under the tilted measure (remove direction).

    Under :math:`dP_s \propto e^{sL} dP` a step includes the record with probability
    :math:`1 - (1-q) e^{K(s-1) - K(s)}`. When the sum over steps is small the tilted loss is a
    Poisson mixture, not near-Gaussian, and the saddle-point expansion is unreliable.
    """
    total = 0.0
    for (q, sigma), steps in composition.grouped().items():
        plrv = plrv_for(q, sigma)
        total += (
            steps * -math.expm1(math.log1p(-q) + plrv.cgf_derivatives(s - 1.0)[0] - plrv.cgf_derivatives(s)[0])
            if q < 1
            else steps
        )
    return total


def _relative_correction(c: np.ndarray, s: float) -> float:
    """Size of the O(1/T) correction relative to the leading saddle-point term."""
    _, _, k2, k3, k4 = c
    h0 = 1.0 / s - 1.0 / (s + 1.0)
    h1 = -1.0 / s**2 + 1.0 / (s + 1.0) ** 2
    h2 = 2.0 / s**3 - 2.0 / (s + 1.0) ** 3
    return (h0 * (k4 / k2**2 / 8.0 - 5.0 * k3**2 / k2**3 / 24.0) + h1 * k3 / (2.0 * k2**2) - h2 / (2.0 * k2)) / h0


def _log_delta_at(c: np.ndarray, s: float) -> float:
    """``log delta`` from the CGF derivatives ``c`` at saddle point ``s`` (``epsilon = c[1]``)."""
    k0, eps, k2, k3, k4 = c
    w2 = max(2.0 * (s * eps - k0), 0.0)
    w = math.copysign(math.sqrt(w2), s)
    lam3 = k3 / k2**1.5
    lam4 = k4 / k2**2
    h0 = 1.0 / s - 1.0 / (s + 1.0)
    h1 = -1.0 / s**2 + 1.0 / (s + 1.0) ** 2
    h2 = 2.0 / s**3 - 2.0 / (s + 1.0) ** 3
    body = (h0 * (1.0 + lam4 / 8.0 - 5.0 * lam3**2 / 24.0) + h1 * k3 / (2.0 * k2**2) - h2 / (2.0 * k2)) / math.sqrt(k2)
    log_phi = -0.5 * w2 - _LOG_SQRT_2PI
    if w > 0.0:
        mills = math.sqrt(math.pi / 2.0) * float(erfcx(w / math.sqrt(2.0)))
        total = mills - 1.0 / w + 1.0 / w**3 + body
        if not total > 0.0:
            raise _Breakdown(f"saddle-point expansion gives delta <= 0 at s = {s:.4g}")
        return log_phi + math.log(total)
    value = float(ndtr(-w)) + math.exp(log_phi) * (-1.0 / w + 1.0 / w**3 + body) if w != 0.0 else math.nan
    if not value > 0.0:
        raise _Breakdown(f"saddle-point expansion gives delta <= 0 at s = {s:.4g}")
    return math.log(value)


@register_accountant("saddlepoint")
class SaddlePointAccountant(Accountant):
    """Saddle-point (exponentially tilted Edgeworth) accountant; an ``estimate``.

    Notes
    -----
    Both directions (remove and add one record) are computed and the worse is reported.

    Where the expansion is outside its domain (fewer than :data:`MIN_TILTED_INCLUSIONS` expected
    record inclusions under the tilted measure, which happens when ``q * steps`` is small; a
    correction term larger than :data:`MAX_RELATIVE_CORRECTION` of the leading term; or a
    non-positive delta from the expansion) the accountant answers with the certifier's (``pld-fast``) value
    instead of a wrong estimate, and counts it in :attr:`fallbacks`. Measured accuracy and the
    fallback region are in docs/benchmarks.md.
    """

    kind = "estimate"

    def __init__(self) -> None:
        self.fallbacks = 0

    def _fallback(self, why: str) -> Accountant:
        self.fallbacks += 1
        log.debug("saddle point not trusted here (%s); answering with the certifier's value", why)
        return certifier()

    def _epsilon(self, composition: Composition, delta: float) -> float:
        try:
            return self._saddle_epsilon(composition, delta)
        except (_Breakdown, OverflowError, _Unreliable) as err:
            return self._fallback(str(err)).get_epsilon(composition, delta)

    def _delta(self, composition: Composition, epsilon: float) -> float:
        try:
            return self._saddle_delta(composition, epsilon)
        except (_Breakdown, OverflowError, _Unreliable) as err:
            return self._fallback(str(err)).get_delta(composition, epsilon)

    @staticmethod
    def _check_reliable(composition: Composition, s: float, direction: int) -> None:
        correction = _relative_correction(_direction_cgf(composition, s, direction), s)
        if abs(correction) > MAX_RELATIVE_CORRECTION:
            raise _Unreliable(f"correction {correction:+.2f} of the leading term exceeds {MAX_RELATIVE_CORRECTION:g}")
        if direction == 0:
            m = _tilted_inclusions(composition, s)
            if m < MIN_TILTED_INCLUSIONS:
                raise _Unreliable(f"{m:.3g} expected tilted inclusions < {MIN_TILTED_INCLUSIONS:g}")

    def _saddle_epsilon(self, composition: Composition, delta: float) -> float:
        log_target = math.log(delta)
        s_min = _s_min(composition)
        worst = 0.0
        for direction in (0, 1):

            def log_delta(s: float, direction: int = direction) -> float:
                return _log_delta_at(_direction_cgf(composition, s, direction), s)

            crossing = last_crossing(log_delta, log_target, s_min, 1.0, what="saddle point", rtol=1e-9)
            if crossing is None:
                raise AccountingError(
                    f"delta = {delta:g} is too large for the saddle-point expansion (it is met below the mean loss)"
                )
            self._check_reliable(composition, crossing.x, direction)
            worst = max(worst, float(_direction_cgf(composition, crossing.x, direction)[1]))
        return worst

    def _saddle_delta(self, composition: Composition, epsilon: float) -> float:
        s_min = _s_min(composition)
        # the add-direction loss -L = -log r(x) is bounded by sum T log(1/(1-q)): beyond it delta is 0
        add_bound = sum(
            steps * -math.log1p(-q) if q < 1 else math.inf for (q, _), steps in composition.grouped().items()
        )
        worst = 0.0
        for direction in (0, 1):
            if direction == 1 and epsilon >= add_bound:
                continue

            def slope(s: float, direction: int = direction) -> float:
                return float(_direction_cgf(composition, s, direction)[1])

            s = increasing_root(slope, epsilon, -1.0 + 1e-9, 1.0, what="saddle point for delta")
            if s < s_min:  # epsilon at or below the mean loss: delta is large and the expansion not trusted
                raise _Unreliable(f"epsilon {epsilon:g} is at or below the mean privacy loss (s = {s:.3g})")
            self._check_reliable(composition, s, direction)
            worst = max(worst, math.exp(_log_delta_at(_direction_cgf(composition, s, direction), s)))
        return worst


class _Unreliable(ArithmeticError):
    """Too few expected tilted inclusions for the expansion (see :data:`MIN_TILTED_INCLUSIONS`)."""
