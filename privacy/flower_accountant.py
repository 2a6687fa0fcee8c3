"""fedtune's accountants behind Flower's ``flwr.serverapp.PrivacyAccountant`` protocol.

Flower's DP strategy wrappers (``DifferentialPrivacyServerSideFixedClipping`` and friends) take an
``accountant=`` for client-level DP. :class:`FlowerPrivacyAccountant` implements that protocol with
the same code as the rest of fedtune: estimates from the configured accountant, budget checks
(``would_exceed``) always with the certified ``pld`` bound.
"""

from __future__ import annotations

import math
from typing import Any

from flwr.serverapp import PrivacyAccountant
from flwr.supercore.privacy_accounting import (
    GaussianPrivacyEvent,
    NeighboringRelation,
    PrivacyConfig,
    PrivacySpent,
    SamplingMethod,
)

from fedtune.privacy.accountants import UnsupportedEventError, get_accountant
from fedtune.privacy.calibration import DEFAULT_ACCOUNTANT, certifier
from fedtune.privacy.events import Composition, SubsampledGaussianEvent, check_delta, check_epsilon

__all__ = ["FlowerPrivacyAccountant"]

_STATE_SCHEMA = "fedtune.flower-accountant/1"


class FlowerPrivacyAccountant:
    """Implements ``flwr.serverapp.PrivacyAccountant`` with fedtune's accountants.

    Parameters
    ----------
    config : flwr.serverapp.PrivacyConfig
        Flower's privacy configuration. Poisson sampling with add-or-remove-one neighbours, and no
        amplification (``q = 1``), are supported; sampling without replacement is a different
        neighbouring relation that fedtune's accountants do not model.
    accountant : str
        fedtune accountant for reported epsilons (default ``saddlepoint``).

    Raises
    ------
    UnsupportedEventError
        For ``SamplingMethod.WITHOUT_REPLACEMENT``.
    """

    def __init__(self, config: PrivacyConfig, accountant: str = DEFAULT_ACCOUNTANT) -> None:
        if config.sampling_method is SamplingMethod.WITHOUT_REPLACEMENT:
            raise UnsupportedEventError(
                "sampling without replacement (replace-one neighbours) is not supported; use Poisson sampling"
            )
        if config.neighboring_relation is not NeighboringRelation.ADD_OR_REMOVE_ONE:
            raise UnsupportedEventError(f"neighbouring relation {config.neighboring_relation.value!r} is not supported")
        self._config = config
        self._accountant = get_accountant(accountant)
        self._events: list[tuple[GaussianPrivacyEvent, int]] = []

    @property
    def config(self) -> PrivacyConfig:
        """The privacy configuration."""
        return self._config

    @property
    def num_releases(self) -> int:
        """Number of composed releases."""
        return sum(count for _, count in self._events)

    def _to_event(self, event: GaussianPrivacyEvent, count: int) -> SubsampledGaussianEvent:
        if not isinstance(event, GaussianPrivacyEvent):
            raise TypeError(f"expected a flwr GaussianPrivacyEvent, got {event!r}")
        if event.population_size != self._config.population_size:
            raise ValueError(
                f"event population_size {event.population_size} differs from the configured "
                f"{self._config.population_size}"
            )
        if self._config.sampling_method is SamplingMethod.NO_AMPLIFICATION:
            q = 1.0
        else:
            q = event.sample_size / event.population_size
        return SubsampledGaussianEvent(q, event.noise_multiplier, count)

    def _composition(self, extra: tuple[GaussianPrivacyEvent, int] | None = None) -> Composition | None:
        pairs = self._events + ([extra] if extra else [])
        if not pairs:
            return None
        return Composition(tuple(self._to_event(e, c) for e, c in pairs))

    def compose(self, event: GaussianPrivacyEvent, count: int = 1) -> None:
        """Compose ``count`` identical releases."""
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"count must be an integer >= 1, got {count!r}")
        self._to_event(event, count)  # validate before storing
        self._events.append((event, count))

    def get_epsilon(self, delta: float) -> float:
        """Epsilon at ``delta`` (0 before any release)."""
        delta = check_delta(delta)
        comp = self._composition()
        return 0.0 if comp is None else self._accountant.get_epsilon(comp, delta)

    def get_delta(self, epsilon: float) -> float:
        """Delta at ``epsilon`` (0 before any release)."""
        epsilon = check_epsilon(epsilon, allow_zero=True)
        comp = self._composition()
        return 0.0 if comp is None else self._accountant.get_delta(comp, epsilon)

    def get_privacy_spent(self, delta: float | None = None) -> PrivacySpent:
        """Cumulative spend at ``delta`` (default: the configured target delta)."""
        delta = self._config.target_delta if delta is None else delta
        return PrivacySpent(
            epsilon=self.get_epsilon(delta),
            delta=delta,
            num_releases=self.num_releases,
            accounting_method=self._accountant.name,
        )

    def would_exceed(self, event: GaussianPrivacyEvent, max_epsilon: float | None = None, count: int = 1) -> bool:
        """Whether composing ``event`` would exceed ``max_epsilon`` (certified ``pld`` bound)."""
        limit = self._config.max_epsilon if max_epsilon is None else max_epsilon
        if limit is None:
            raise ValueError("no epsilon limit: pass max_epsilon or set PrivacyConfig.max_epsilon")
        limit = check_epsilon(limit)
        if math.isinf(limit):
            return False
        comp = self._composition((event, count))
        assert comp is not None  # it holds at least the planned event
        return certifier().get_epsilon(comp, self._config.target_delta) > limit

    def state_dict(self) -> dict[str, object]:
        """Serializable state: the events, so any accountant can re-check them."""
        return {
            "schema": _STATE_SCHEMA,
            "accountant": self._accountant.name,
            "events": [
                {
                    "noise_multiplier": e.noise_multiplier,
                    "sample_size": e.sample_size,
                    "population_size": e.population_size,
                    "count": c,
                }
                for e, c in self._events
            ],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`."""
        if not isinstance(state, dict) or state.get("schema") != _STATE_SCHEMA:
            raise ValueError(f"not a fedtune Flower accountant state (schema {_STATE_SCHEMA!r} expected)")
        events = []
        for raw in state["events"]:
            event = GaussianPrivacyEvent(
                float(raw["noise_multiplier"]), int(raw["sample_size"]), int(raw["population_size"])
            )
            self._to_event(event, int(raw["count"]))
            events.append((event, int(raw["count"])))
        self._events = events


_: type[PrivacyAccountant] = FlowerPrivacyAccountant  # structural check for type checkers
