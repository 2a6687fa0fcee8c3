"""The accountant interface and its registry.

An accountant turns a composition of privacy events into ``epsilon(delta)`` or ``delta(epsilon)``
for add/remove-one neighbouring datasets. Each says whether its number is an ``estimate`` (an
approximation with no certified error bound) or an ``upper-bound`` (a certified guarantee).

New accountants plug in with :func:`register_accountant`, as in Opacus' ``register_accountant``::

    @register_accountant("mine")
    class MyAccountant(Accountant):
        kind = "estimate"
        def _epsilon(self, composition, delta): ...
        def _delta(self, composition, epsilon): ...
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import ClassVar, Literal

from fedtune.privacy.events import Composition, EventLike, as_composition, check_delta, check_epsilon

__all__ = [
    "Accountant",
    "AccountingError",
    "UnsupportedEventError",
    "Kind",
    "register_accountant",
    "get_accountant",
    "available_accountants",
]

Kind = Literal["estimate", "upper-bound"]


class AccountingError(RuntimeError):
    """An accountant could not produce a trustworthy number (e.g. its root search did not converge)."""


class UnsupportedEventError(ValueError):
    """The accountant cannot account for this kind of event."""


class Accountant(ABC):
    """Base class: turns a composition of privacy events into epsilon or delta.

    Subclasses implement the two hooks :meth:`_epsilon` and :meth:`_delta`; the public methods
    validate input once, so every accountant refuses bad values the same way.

    Attributes
    ----------
    name : str
        Registry name (set by :func:`register_accountant`).
    kind : {"estimate", "upper-bound"}
        ``upper-bound`` only when the number is a certified guarantee.
    """

    name: ClassVar[str] = "abstract"
    kind: ClassVar[Kind] = "estimate"

    def get_epsilon(self, events: EventLike, delta: float) -> float:
        """Smallest epsilon such that the composition is (epsilon, delta)-DP.

        Parameters
        ----------
        events : SubsampledGaussianEvent, Composition or iterable of events
            What was spent.
        delta : float
            In (0, 1).

        Returns
        -------
        float
            Epsilon >= 0 (``inf`` if no finite epsilon achieves ``delta``).
        """
        delta = check_delta(delta)
        return float(self._epsilon(as_composition(events), delta))

    def get_delta(self, events: EventLike, epsilon: float) -> float:
        """Smallest delta such that the composition is (epsilon, delta)-DP.

        Parameters
        ----------
        events : SubsampledGaussianEvent, Composition or iterable of events
            What was spent.
        epsilon : float
            Epsilon >= 0.
        """
        epsilon = check_epsilon(epsilon, allow_zero=True)
        if math.isinf(epsilon):
            return 0.0
        return float(min(1.0, max(0.0, self._delta(as_composition(events), epsilon))))

    @abstractmethod
    def _epsilon(self, composition: Composition, delta: float) -> float:
        """Hook: epsilon for validated input."""

    @abstractmethod
    def _delta(self, composition: Composition, epsilon: float) -> float:
        """Hook: delta for validated input."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, kind={self.kind!r})"


_REGISTRY: dict[str, Callable[[], Accountant]] = {}


def register_accountant(name: str, **defaults: object) -> Callable[[type[Accountant]], type[Accountant]]:
    """Class decorator adding an accountant to the registry under ``name``.

    Parameters
    ----------
    name : str
        Registry key, used by the CLI (``--accountant``) and the ledger.
    **defaults
        Keyword arguments the registered entry passes to the class (one class may be registered
        several times with different settings, e.g. Edgeworth of order 1 and 2).
    """

    def decorate(cls: type[Accountant]) -> type[Accountant]:
        if name in _REGISTRY:
            raise ValueError(f"an accountant named {name!r} is already registered")

        def factory() -> Accountant:
            instance = cls(**defaults)
            instance.name = name  # type: ignore[misc]
            return instance

        _REGISTRY[name] = factory
        if cls.name == "abstract":
            cls.name = name
        return cls

    return decorate


def available_accountants() -> list[str]:
    """Names of all registered accountants, in registration order."""
    _load_builtin()
    return list(_REGISTRY)


def get_accountant(name: str | Accountant) -> Accountant:
    """Return a fresh accountant by registry name (an instance is returned unchanged).

    Raises
    ------
    ValueError
        If ``name`` is not registered; the message lists the registered names.
    """
    if isinstance(name, Accountant):
        return name
    _load_builtin()
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"unknown accountant {name!r}; available: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]()


def _load_builtin() -> None:
    # importing the package registers the built-in accountants
    import fedtune.privacy.accountants  # noqa: F401
