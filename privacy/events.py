"""Privacy spending described as frozen data.

An *event* says what a mechanism did, never how much privacy it cost: accountants turn events into
epsilon (see :mod:`fedtune.privacy.accountants`). This mirrors ``dp_accounting.DpEvent`` and keeps the
ledger re-checkable by any accountant later.

The only mechanism DP-SGD needs is the Poisson-subsampled Gaussian mechanism (Abadi et al. 2016,
arXiv 1607.00133): at each step every record is included independently with probability ``q``, the
per-example gradients are clipped to norm ``C`` and summed, and Gaussian noise of standard deviation
``sigma * C`` is added. Privacy depends on ``(q, sigma)`` and the number of steps only.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = [
    "SubsampledGaussianEvent",
    "Composition",
    "as_composition",
    "check_delta",
    "check_epsilon",
]


def _check_real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r} of type {type(value).__name__}")
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"{name} must be a number, got nan")
    return value


def check_delta(delta: object) -> float:
    """Return ``delta`` as a float after checking ``0 < delta < 1``.

    Raises
    ------
    ValueError
        If ``delta`` is not in the open interval (0, 1).
    TypeError
        If ``delta`` is not a real number.
    """
    value = _check_real("delta", delta)
    if not 0.0 < value < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    return value


def check_epsilon(epsilon: object, *, allow_zero: bool = False) -> float:
    """Return ``epsilon`` as a float after checking ``epsilon > 0`` (finite or ``inf``).

    Parameters
    ----------
    epsilon : float
        Privacy parameter; ``math.inf`` means "no privacy".
    allow_zero : bool
        Accept ``epsilon == 0`` (used by ``delta(epsilon)`` queries).

    Raises
    ------
    ValueError
        If ``epsilon <= 0`` (or ``< 0`` with ``allow_zero``).
    """
    value = _check_real("epsilon", epsilon)
    if value < 0.0 or (value == 0.0 and not allow_zero):
        allowed = "[0, inf]" if allow_zero else "(0, inf]"
        raise ValueError(f"epsilon must be in {allowed}, got {epsilon!r}")
    return value


@dataclass(frozen=True)
class SubsampledGaussianEvent:
    """``steps`` repetitions of the Poisson-subsampled Gaussian mechanism.

    Parameters
    ----------
    sampling_rate : float
        Poisson sampling probability ``q`` in (0, 1]: each record is in a batch independently with
        probability ``q`` (``q = expected batch size / dataset size``). ``q = 1`` is the full-batch
        Gaussian mechanism.
    noise_multiplier : float
        ``sigma > 0``: the noise standard deviation divided by the clipping norm (sensitivity).
    steps : int
        Number of steps ``T >= 1`` (independent repetitions, composed).

    Notes
    -----
    With sensitivity normalised to 1, one step compares ``P = (1 - q) N(0, sigma^2) + q N(1, sigma^2)``
    with ``Q = N(0, sigma^2)`` (add/remove-one neighbouring datasets); accountants take the worse of
    the two directions ``(P, Q)`` and ``(Q, P)``.
    """

    sampling_rate: float
    noise_multiplier: float
    steps: int = 1

    def __post_init__(self) -> None:
        q = _check_real("sampling_rate", self.sampling_rate)
        if not 0.0 < q <= 1.0:
            raise ValueError(f"sampling_rate q must be in (0, 1], got {self.sampling_rate!r}")
        sigma = _check_real("noise_multiplier", self.noise_multiplier)
        if not 0.0 < sigma < math.inf:
            raise ValueError(f"noise_multiplier sigma must be in (0, inf), got {self.noise_multiplier!r}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, numbers.Integral):
            raise TypeError(f"steps must be an integer, got {self.steps!r} of type {type(self.steps).__name__}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps!r}")
        object.__setattr__(self, "sampling_rate", q)
        object.__setattr__(self, "noise_multiplier", sigma)
        object.__setattr__(self, "steps", int(self.steps))

    @property
    def mechanism(self) -> tuple[float, float]:
        """The ``(q, sigma)`` pair: everything but the step count."""
        return (self.sampling_rate, self.noise_multiplier)

    def repeated(self, times: int) -> SubsampledGaussianEvent:
        """This event composed with itself ``times`` times (``steps * times`` steps)."""
        return SubsampledGaussianEvent(self.sampling_rate, self.noise_multiplier, self.steps * times)

    def to_dict(self) -> dict[str, float | int]:
        """JSON-ready form; :meth:`from_dict` inverts it exactly."""
        return {"sampling_rate": self.sampling_rate, "noise_multiplier": self.noise_multiplier, "steps": self.steps}

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> SubsampledGaussianEvent:
        """Rebuild an event from :meth:`to_dict` output, validating every field."""
        try:
            return cls(data["sampling_rate"], data["noise_multiplier"], data["steps"])  # type: ignore[arg-type]
        except KeyError as err:
            raise ValueError(f"privacy event is missing the field {err.args[0]!r}: {data!r}") from None


@dataclass(frozen=True)
class Composition:
    """Adaptive composition of subsampled Gaussian events (which may differ in ``q`` or ``sigma``).

    Parameters
    ----------
    events : tuple of SubsampledGaussianEvent
        The composed events, in order. Order does not change the privacy cost.
    """

    events: tuple[SubsampledGaussianEvent, ...]

    def __post_init__(self) -> None:
        events = tuple(self.events)
        if not events:
            raise ValueError("a composition needs at least one event, got none")
        for event in events:
            if not isinstance(event, SubsampledGaussianEvent):
                raise TypeError(f"a composition holds SubsampledGaussianEvent objects, got {event!r}")
        object.__setattr__(self, "events", events)

    @property
    def steps(self) -> int:
        """Total number of steps over all events."""
        return sum(event.steps for event in self.events)

    def grouped(self) -> dict[tuple[float, float], int]:
        """Total steps per distinct ``(q, sigma)``: all an accountant needs, since steps commute."""
        groups: dict[tuple[float, float], int] = {}
        for event in self.events:
            groups[event.mechanism] = groups.get(event.mechanism, 0) + event.steps
        return groups

    def __add__(self, other: object) -> Composition:
        if isinstance(other, SubsampledGaussianEvent):
            return Composition(self.events + (other,))
        if isinstance(other, Composition):
            return Composition(self.events + other.events)
        return NotImplemented


EventLike = SubsampledGaussianEvent | Composition | Iterable[SubsampledGaussianEvent]


def as_composition(events: EventLike) -> Composition:
    """Normalise an event, a composition or an iterable of events to a :class:`Composition`."""
    if isinstance(events, Composition):
        return events
    if isinstance(events, SubsampledGaussianEvent):
        return Composition((events,))
    if isinstance(events, (str, bytes)) or not isinstance(events, Iterable):
        raise TypeError(f"expected a privacy event or a sequence of them, got {events!r}")
    return Composition(tuple(events))
