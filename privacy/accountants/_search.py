"""Bracketed, monotone root search shared by the analytic accountants.

Approximations (Edgeworth in particular) need not be monotone in their tails, so a plain root
finder can return a spurious crossing. :func:`last_crossing` brackets the target, scans the bracket
for every crossing, refines the *largest* one (the conservative choice for epsilon) with Brent's
method, checks convergence, and reports whether the curve crossed more than once.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy.optimize import brentq

from fedtune.privacy.accountants.base import AccountingError

__all__ = ["Crossing", "last_crossing", "increasing_root"]

log = logging.getLogger(__name__)

_MAX_DOUBLINGS = 80
_SCAN_POINTS = 12


@dataclass(frozen=True)
class Crossing:
    """Result of :func:`last_crossing`: the root, and how many crossings the scan saw."""

    x: float
    crossings: int


def last_crossing(
    f: Callable[[float], float],
    target: float,
    lo: float,
    hi: float,
    *,
    what: str,
    rtol: float = 1e-6,
) -> Crossing | None:
    """Largest ``x`` in ``[lo, inf)`` where a (nominally decreasing) ``f`` falls to ``target``.

    Parameters
    ----------
    f : callable
        Function of one float, nominally decreasing (e.g. ``delta(epsilon)``).
    target : float
        Level to hit (``> 0``).
    lo, hi : float
        Start of the search and a first guess for the upper bracket; ``hi`` is doubled (measured
        from ``lo``) until ``f(hi) <= target`` and ``f`` stays below ``target`` at ``2 hi``.
    what : str
        Name of the quantity, for error messages.
    rtol : float
        Convergence check: ``|f(x) - target| <= rtol * target`` after refinement (or the bracket
        has shrunk to floating-point resolution).

    Returns
    -------
    Crossing or None
        ``None`` when ``f(lo) <= target`` already (no crossing at or above ``lo``).

    Raises
    ------
    AccountingError
        If no upper bracket is found or the refinement does not converge.
    """
    if not f(lo) > target:
        return None
    width = max(hi - lo, 1e-12)
    for _ in range(_MAX_DOUBLINGS):
        hi = lo + width
        if f(hi) <= target and f(lo + 2.0 * width) <= target:
            break
        width *= 2.0
    else:
        raise AccountingError(f"could not bracket {what}: f stays above {target:g} up to {lo + width:g}")
    grid = np.linspace(lo, lo + 2.0 * width, 2 * _SCAN_POINTS + 1)
    above = np.array([f(float(x)) > target for x in grid])
    crossings = int(np.sum(above[:-1] & ~above[1:]))
    last = int(np.nonzero(above)[0].max())
    a, b = float(grid[last]), float(grid[last + 1])

    def g(x: float) -> float:
        return f(x) - target

    x = brentq(g, a, b, xtol=1e-14 * max(1.0, abs(b)), rtol=1e-15, maxiter=200)
    err = abs(g(x))
    if err > rtol * target and (b - a) > 1e-9 * max(1.0, abs(b)):
        # a jump rather than a root: accept only if the bracket collapsed onto it
        a2, b2 = x - 1e-9 * max(1.0, abs(x)), x + 1e-9 * max(1.0, abs(x))
        if not (g(a2) > 0 >= g(b2)):
            raise AccountingError(
                f"root search for {what} did not converge: |f(x) - target| = {err:.3g} at x = {x:.6g}"
            )
    if crossings > 1:
        log.warning(
            "%s: the approximation crosses the target %d times; the largest root (conservative) is used",
            what,
            crossings,
        )
    return Crossing(x=float(x), crossings=max(crossings, 1))


def increasing_root(f: Callable[[float], float], target: float, lo: float, hi: float, *, what: str) -> float:
    """Root of an increasing ``f`` (e.g. a CGF derivative) in ``(lo, inf)``, bracket grown upward."""
    if f(lo) > target:
        raise AccountingError(f"{what}: f({lo:g}) = {f(lo):g} is already above {target:g}")
    width = max(hi - lo, 1e-6)
    for _ in range(_MAX_DOUBLINGS):
        if f(lo + width) >= target:
            break
        width *= 2.0
    else:
        raise AccountingError(f"could not bracket {what}")
    x = brentq(lambda s: f(s) - target, lo, lo + width, xtol=1e-13, rtol=1e-15, maxiter=200)
    if not math.isfinite(x):
        raise AccountingError(f"{what}: root search returned {x}")
    return float(x)
