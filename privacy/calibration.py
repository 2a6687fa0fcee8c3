r"""Noise calibration: the smallest noise multiplier that meets a privacy target.

``epsilon(sigma)`` of the subsampled Gaussian mechanism decreases in ``sigma``, so the smallest
``sigma`` with ``epsilon(sigma) <= target`` is found by bracketing (the bracket doubles, with no fixed
grid, so ``sigma > 2`` and tiny epsilons work) and Brent's method in ``log sigma``.

fedtune calibrates fast with an Edgeworth-family *estimate* (the saddle-point accountant by default),
then *certifies*: starting from the estimate's sigma it searches (Brent's method in ``log sigma``) for the
smallest sigma whose certified upper bound (:func:`certifier`, ``pld-fast``) meets the target, and
reports both sigmas. The sigma it returns for training is the certified one. Because ``pld-fast`` is
within about 0.1% of the exact PLD epsilon and costs milliseconds, the certified sigma lands within
about 0.1% of the smallest sigma that meets the target (docs/benchmarks.md, issue 12); before, sigma was
only ever raised from the estimate's, and an estimate that overstated epsilon left up to +0.9% of noise.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass

from scipy.optimize import brentq

from fedtune.privacy.accountants import Accountant, AccountingError, get_accountant
from fedtune.privacy.accountants.reference import certifier
from fedtune.privacy.events import Composition, SubsampledGaussianEvent, check_delta, check_epsilon

__all__ = ["Calibration", "calibrate_noise", "smallest_sigma", "DEFAULT_ACCOUNTANT", "certifier"]

log = logging.getLogger(__name__)

#: The fast estimate used for calibration unless another accountant is named.
DEFAULT_ACCOUNTANT = "saddlepoint"
_SIGMA_RTOL = 1e-4
#: First bracket step (a factor on sigma) around the estimate when searching on the certified bound.
_CERTIFY_GROWTH = 1.01


@dataclass(frozen=True)
class Calibration:
    """Result of :func:`calibrate_noise`.

    Attributes
    ----------
    sigma : float
        The noise multiplier to train with (certified unless ``certified`` is False).
    sigma_estimate : float
        The smallest sigma the calibrating accountant alone asks for.
    epsilon_estimate : float
        The calibrating accountant's epsilon at ``sigma``.
    certified_epsilon : float or None
        The certifying (``pld-fast``) upper bound at ``sigma``; None if certification was skipped.
    accountant, certifier : str
        Names of the accountants used.
    certified : bool
        Whether ``certified_epsilon <= target``.
    """

    sigma: float
    sigma_estimate: float
    epsilon_estimate: float
    certified_epsilon: float | None
    target_epsilon: float
    delta: float
    sampling_rate: float
    steps: int
    accountant: str
    certifier: str | None
    certified: bool

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form."""
        return asdict(self)


def _compose(spent: Composition | None, q: float, sigma: float, steps: int) -> Composition:
    planned = SubsampledGaussianEvent(q, sigma, steps)
    return Composition((planned,)) if spent is None else spent + planned


def smallest_sigma(
    accountant: Accountant,
    target_epsilon: float,
    delta: float,
    sampling_rate: float,
    steps: int,
    *,
    spent: Composition | None = None,
    start: float = 1.0,
    rtol: float = _SIGMA_RTOL,
    growth: float = 2.0,
) -> float:
    """Smallest sigma with ``accountant`` epsilon of ``spent + (q, sigma, steps)`` at most the target.

    Parameters
    ----------
    accountant : Accountant
        Any accountant.
    target_epsilon, delta : float
        The privacy target.
    sampling_rate : float
        Poisson rate ``q`` of the planned steps.
    steps : int
        Number of planned steps.
    spent : Composition, optional
        Events already spent, composed with the planned ones.
    start : float
        First guess for the bracket.
    rtol : float
        Relative tolerance on sigma; the returned sigma is on the safe (larger) side.
    growth : float
        First bracketing step, a factor > 1 on sigma; the step doubles up to a factor 2 per try. A
        ``start`` close to the answer with a small ``growth`` (e.g. 1.01) saves accountant calls.

    Raises
    ------
    ValueError
        If the target cannot be met by any sigma (``spent`` alone exceeds it).
    """
    SubsampledGaussianEvent(sampling_rate, 1.0, steps)  # validates q and steps

    def excess(log_sigma: float) -> float:
        return (
            accountant.get_epsilon(_compose(spent, sampling_rate, math.exp(log_sigma), steps), delta) - target_epsilon
        )

    if not growth > 1.0:
        raise ValueError(f"growth must be > 1, got {growth!r}")
    first_step = min(math.log(growth), math.log(2.0))

    def bracket_steps() -> Iterator[float]:
        step = first_step
        for _ in range(60):
            yield step
            step = min(2.0 * step, math.log(2.0))

    lo = hi = math.log(start)
    if excess(hi) > 0:
        for step in bracket_steps():
            lo, hi = hi, hi + step
            if excess(hi) <= 0:
                break
        else:
            raise ValueError(
                f"no noise multiplier up to {math.exp(hi):.3g} meets epsilon = {target_epsilon:g} at delta = {delta:g}"
                + (" (the events already spent may exceed it)" if spent is not None else "")
            )
    else:
        for step in bracket_steps():
            lo = hi - step
            if excess(lo) > 0:
                break
            hi = lo
        else:
            return math.exp(hi)
    log_sigma = brentq(excess, lo, hi, xtol=rtol / 4, rtol=1e-12)
    sigma = math.exp(log_sigma)
    while excess(math.log(sigma)) > 0:  # land on the safe side of the root
        sigma *= 1.0 + rtol / 4
    return sigma


def calibrate_noise(
    target_epsilon: float,
    delta: float,
    sampling_rate: float,
    steps: int,
    *,
    accountant: str | Accountant = DEFAULT_ACCOUNTANT,
    certify: bool = True,
    spent: Composition | None = None,
) -> Calibration:
    """Calibrate sigma with ``accountant``, then find the smallest sigma the certified bound accepts.

    Parameters
    ----------
    target_epsilon : float
        Budget ``epsilon > 0`` (finite: ``inf`` means no noise and is handled by the caller).
    delta : float
        In (0, 1).
    sampling_rate : float
        Poisson rate ``q`` in (0, 1].
    steps : int
        Planned number of steps.
    accountant : str or Accountant
        Calibrating accountant (default ``saddlepoint``).
    certify : bool
        Search, from the estimate's sigma, for the smallest sigma whose certified (``pld-fast``) epsilon
        meets the target, and train with it (default). If False the result is an estimate and
        ``certified`` is False.
    spent : Composition, optional
        Events already spent (e.g. earlier rounds), composed with the planned steps.

    Returns
    -------
    Calibration
    """
    target_epsilon = check_epsilon(target_epsilon)
    if math.isinf(target_epsilon):
        raise ValueError("epsilon = inf needs no noise: train without DP instead of calibrating")
    delta = check_delta(delta)
    acc = get_accountant(accountant)
    sigma_est = smallest_sigma(acc, target_epsilon, delta, sampling_rate, steps, spent=spent)
    eps_est = acc.get_epsilon(_compose(spent, sampling_rate, sigma_est, steps), delta)
    if not certify:
        log.warning("noise calibrated with %s without certification: epsilon %.4g is an estimate", acc.name, eps_est)
        return Calibration(
            sigma_est, sigma_est, eps_est, None, target_epsilon, delta, sampling_rate, steps, acc.name, None, False
        )
    cert = certifier()
    # search on the certified bound itself, from the estimate: raise or lower sigma to the smallest
    # that certifies (an estimate that overstates epsilon would otherwise leave noise on the table)
    sigma = smallest_sigma(
        cert, target_epsilon, delta, sampling_rate, steps, spent=spent, start=sigma_est, growth=_CERTIFY_GROWTH
    )
    certified_eps = cert.get_epsilon(_compose(spent, sampling_rate, sigma, steps), delta)
    if sigma != sigma_est:
        log.info(
            "%s asked for sigma = %.5f; the certified bound (%s) needs %.5f (epsilon %.6g)",
            acc.name,
            sigma_est,
            cert.name,
            sigma,
            certified_eps,
        )
    if certified_eps > target_epsilon * (1 + 1e-9):
        raise AccountingError(
            f"certification failed: {cert.name} epsilon {certified_eps:.6g} > target {target_epsilon:g}"
        )
    eps_at_sigma = acc.get_epsilon(_compose(spent, sampling_rate, sigma, steps), delta)
    return Calibration(
        sigma,
        sigma_est,
        eps_at_sigma,
        certified_eps,
        target_epsilon,
        delta,
        sampling_rate,
        steps,
        acc.name,
        cert.name,
        True,
    )
