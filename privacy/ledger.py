r"""The privacy ledger: every event each client spent, stored atomically, re-checkable by any accountant.

The ledger stores *events* (``q``, ``sigma``, ``steps``), never epsilons, so any accountant can
recompute the numbers later (``fedtune privacy ledger PATH``).

Record-level epsilon of the federation. Client ``k`` runs DP-SGD on its own shard ``D_k`` and the
shards are disjoint. A record lives in exactly one shard, so adding or removing it changes only that
client's training; all other clients' outputs are independent of it. By parallel composition the
federation is (``max_k eps_k``, ``max_k delta_k``)-DP at the record level, where ``eps_k`` composes all
of client ``k``'s rounds. The server's aggregation is post-processing. (McMahan et al. 2018; Ponomareva
et al. 2023, "How to DP-fy ML", Sec. 4.)

Client-level (user-level) DP is a different guarantee: it protects a client's whole contribution and
needs noise added by the server (DP-FedAvg). Server events are kept separately
(:meth:`PrivacyLedger.record_server_event`) and :meth:`PrivacyLedger.client_level_epsilon` composes them.

An entry of kind ``"release"`` is a one-off release besides training: a federated client's Gaussian
release of its label counts for logit adjustment, the event ``(q = 1, sigma_h, 1 step)``, recorded
at round :data:`RELEASE_ROUND` (0) before its first round. It composes with the client's rounds like
any other entry; reports count it apart from the rounds trained.
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedtune.io import atomic_write_json, read_json
from fedtune.privacy.accountants import Accountant, get_accountant
from fedtune.privacy.calibration import DEFAULT_ACCOUNTANT, certifier
from fedtune.privacy.events import Composition, SubsampledGaussianEvent, check_delta, check_epsilon

__all__ = ["ENTRY_KINDS", "LedgerEntry", "BudgetCheck", "PrivacyLedger", "LEDGER_SCHEMA", "RELEASE_ROUND"]

LEDGER_SCHEMA = "fedtune.privacy-ledger/1"

#: The ledger round of a client's one-off release before its first federated round (label counts).
RELEASE_ROUND = 0

#: What an entry records: DP-SGD training (the default), or a one-off release (label counts).
ENTRY_KINDS = ("train", "release")


@dataclass(frozen=True)
class LedgerEntry:
    """One client's spend in one round.

    Attributes
    ----------
    client_id : str
        Stable client identifier (partition id or node name).
    round : int
        Federated round (>= 0; a centralized run uses round 0 or its epoch).
    event : SubsampledGaussianEvent
        What was spent.
    examples : int
        Size of the client's shard (the ``N`` in ``q = B / N``).
    kind : str
        ``"train"`` (default) or ``"release"`` (:data:`ENTRY_KINDS`). Stored only when not
        ``"train"``, so ledgers without releases read and write exactly as before.
    """

    client_id: str
    round: int
    event: SubsampledGaussianEvent
    examples: int
    kind: str = "train"

    def __post_init__(self) -> None:
        if not isinstance(self.client_id, str) or not self.client_id:
            raise ValueError(f"client_id must be a non-empty string, got {self.client_id!r}")
        if isinstance(self.round, bool) or not isinstance(self.round, int) or self.round < 0:
            raise ValueError(f"round must be an integer >= 0, got {self.round!r}")
        if isinstance(self.examples, bool) or not isinstance(self.examples, int) or self.examples < 1:
            raise ValueError(f"examples must be an integer >= 1, got {self.examples!r}")
        if self.kind not in ENTRY_KINDS:
            raise ValueError(f"kind must be one of {', '.join(ENTRY_KINDS)}, got {self.kind!r}")

    @property
    def key(self) -> tuple[str, int]:
        """``(client_id, round)``: recording the same key twice counts once."""
        return (self.client_id, self.round)

    def to_dict(self) -> dict[str, object]:
        data: dict[str, object] = {"client_id": self.client_id, "round": self.round, "examples": self.examples}
        if self.kind != "train":
            data["kind"] = self.kind
        return {**data, **self.event.to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LedgerEntry:
        try:
            return cls(
                str(data["client_id"]),
                int(data["round"]),
                SubsampledGaussianEvent.from_dict(data),
                int(data["examples"]),
                str(data.get("kind", "train")),
            )
        except KeyError as err:
            raise ValueError(f"ledger entry is missing the field {err.args[0]!r}: {data!r}") from None


@dataclass(frozen=True)
class BudgetCheck:
    """Answer of a prospective budget check.

    Attributes
    ----------
    allowed : bool
        True if the planned event keeps the client within budget.
    epsilon_after : float
        Certified epsilon the client would have after the planned event.
    budget : float
        The epsilon budget checked against.
    reason : str
        Human-readable explanation (empty when allowed).
    """

    allowed: bool
    epsilon_after: float
    budget: float
    reason: str = ""


@dataclass
class PrivacyLedger:
    """Per-client privacy ledger, persisted atomically to ``path`` after every change.

    Parameters
    ----------
    path : Path or None
        JSON file; None keeps the ledger in memory only.
    delta : float
        The delta at which epsilons are reported and budgets enforced.
    budget : float
        Per-client epsilon budget (``inf`` for none).
    accountant : str
        Estimating accountant for reports (default ``saddlepoint``). Budgets are always enforced
        with the certified ``pld`` upper bound.
    """

    path: Path | None
    delta: float
    budget: float = math.inf
    accountant: str = DEFAULT_ACCOUNTANT
    _entries: dict[tuple[str, int], LedgerEntry] = field(default_factory=dict, repr=False)
    _server_events: dict[int, SubsampledGaussianEvent] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        self.delta = check_delta(self.delta)
        self.budget = check_epsilon(self.budget)
        get_accountant(self.accountant)  # validates the name
        if self.path is not None:
            self.path = Path(self.path)

    # -- persistence -------------------------------------------------------------------------
    @classmethod
    def open(
        cls, path: str | Path, delta: float, budget: float = math.inf, accountant: str = DEFAULT_ACCOUNTANT
    ) -> PrivacyLedger:
        """Load the ledger at ``path`` if it exists, else start an empty one there."""
        path = Path(path)
        if path.exists():
            ledger = cls.load(path)
            ledger.delta, ledger.budget = check_delta(delta), check_epsilon(budget)
            return ledger
        return cls(path, delta, budget, accountant)

    @classmethod
    def load(cls, path: str | Path) -> PrivacyLedger:
        """Read a ledger written by :meth:`save`; every entry is re-validated."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no privacy ledger at {path}")
        data = read_json(path)
        if not isinstance(data, dict) or data.get("schema") != LEDGER_SCHEMA:
            raise ValueError(f"{path} is not a fedtune privacy ledger (schema {LEDGER_SCHEMA!r} expected)")
        ledger = cls(
            path,
            data["delta"],
            math.inf if data.get("budget") is None else data["budget"],
            data.get("accountant", DEFAULT_ACCOUNTANT),
        )
        for raw in data.get("entries", []):
            entry = LedgerEntry.from_dict(raw)
            ledger._entries[entry.key] = entry
        for raw in data.get("server_events", []):
            ledger._server_events[int(raw["round"])] = SubsampledGaussianEvent.from_dict(raw)
        return ledger

    def to_dict(self) -> dict[str, object]:
        """The stored form: events only (epsilons are derived, never stored as truth)."""
        return {
            "schema": LEDGER_SCHEMA,
            "delta": self.delta,
            "budget": None if math.isinf(self.budget) else self.budget,
            "accountant": self.accountant,
            "entries": [e.to_dict() for e in sorted(self._entries.values(), key=lambda e: (e.client_id, e.round))],
            "server_events": [{"round": r, **ev.to_dict()} for r, ev in sorted(self._server_events.items())],
        }

    def save(self) -> None:
        """Write the ledger atomically (no-op for an in-memory ledger)."""
        if self.path is not None:
            atomic_write_json(self.path, self.to_dict())

    # -- recording ---------------------------------------------------------------------------
    def record(
        self, client_id: str, round: int, event: SubsampledGaussianEvent, examples: int, kind: str = "train"
    ) -> bool:
        """Record a client's spend for a round (``kind`` ``"train"``) or its one-off release
        (``"release"``, at :data:`RELEASE_ROUND`) and persist it before returning.

        Returns
        -------
        bool
            True if recorded, False if the same ``(client_id, round)`` was already recorded with
            the same event (idempotent: it counts once).

        Raises
        ------
        ValueError
            If ``(client_id, round)`` is already recorded with a *different* event.
        """
        entry = LedgerEntry(client_id, round, event, examples, kind)
        with self._lock:
            existing = self._entries.get(entry.key)
            if existing is not None:
                if existing == entry:
                    return False
                raise ValueError(
                    f"client {client_id!r} round {round} is already recorded as {existing.kind} {existing.event} "
                    f"({existing.examples} examples); refusing a different {kind} {event} ({examples} examples)"
                )
            self._entries[entry.key] = entry
            try:
                self.save()
            except BaseException:
                del self._entries[entry.key]
                raise
            return True

    def record_server_event(self, round: int, event: SubsampledGaussianEvent) -> bool:
        """Record server-side (client-level DP) noise for a round; idempotent per round."""
        with self._lock:
            if self._server_events.get(round) == event:
                return False
            if round in self._server_events:
                raise ValueError(f"round {round} already has server event {self._server_events[round]}; got {event}")
            self._server_events[round] = event
            self.save()
            return True

    # -- queries -----------------------------------------------------------------------------
    def __iter__(self) -> Iterator[LedgerEntry]:
        return iter(sorted(self._entries.values(), key=lambda e: (e.client_id, e.round)))

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def clients(self) -> list[str]:
        """Client ids with at least one entry, sorted."""
        return sorted({e.client_id for e in self._entries.values()})

    def rounds(self, client_id: str) -> list[int]:
        """Rounds recorded for a client."""
        return sorted(r for (c, r) in self._entries if c == client_id)

    def composition(self, client_id: str) -> Composition | None:
        """All events of a client, or None if it spent nothing."""
        events = tuple(e.event for e in self if e.client_id == client_id)
        return Composition(events) if events else None

    def epsilon(self, client_id: str, accountant: str | Accountant | None = None) -> float:
        """A client's epsilon at the ledger's delta over all its rounds (0 if nothing spent)."""
        comp = self.composition(client_id)
        if comp is None:
            return 0.0
        if accountant == "certified":
            return _certified_epsilon(comp, self.delta)
        return get_accountant(accountant or self.accountant).get_epsilon(comp, self.delta)

    def certified_epsilon(self, client_id: str) -> float:
        """A client's certified (``pld`` upper bound) epsilon."""
        return self.epsilon(client_id, "certified")

    def composed_epsilon(self, *, certified: bool = True) -> float:
        """Record-level epsilon of the federation: the maximum over clients (parallel composition)."""
        values = [self.certified_epsilon(c) if certified else self.epsilon(c) for c in self.clients]
        return max(values, default=0.0)

    def client_level_epsilon(self) -> float | None:
        """Client-level epsilon from server-side noise events, or None if the server added none."""
        events = tuple(self.server_events().values())
        return _certified_epsilon(Composition(events), self.delta) if events else None

    def server_events(self) -> dict[int, SubsampledGaussianEvent]:
        """The recorded server (client-level DP) events by round (a copy)."""
        with self._lock:
            return dict(sorted(self._server_events.items()))

    def check_server(self, planned: SubsampledGaussianEvent, budget: float) -> BudgetCheck:
        """Prospective check: would one more server release keep the client-level epsilon within ``budget``?

        Certified (``pld``) bound of the recorded server events composed with ``planned``.
        """
        budget = check_epsilon(budget)
        events = tuple(self.server_events().values())
        after = _certified_epsilon(Composition((*events, planned)), self.delta)
        if after > budget:
            spent = _certified_epsilon(Composition(events), self.delta) if events else 0.0
            return BudgetCheck(
                False,
                after,
                budget,
                f"the client-level epsilon is {spent:.4g} (certified, delta {self.delta:g}) after {len(events)} "
                f"server releases; one more at q = {planned.sampling_rate:.4g}, sigma = {planned.noise_multiplier:.4g} "
                f"would bring it to {after:.4g} > budget {budget:g}",
            )
        return BudgetCheck(True, after, budget)

    def check(self, client_id: str, planned: SubsampledGaussianEvent, budget: float | None = None) -> BudgetCheck:
        """Prospective check: would ``planned`` keep the client within budget? (certified bound)."""
        budget = self.budget if budget is None else check_epsilon(budget)
        comp = self.composition(client_id)
        after = _certified_epsilon(Composition((planned,)) if comp is None else comp + planned, self.delta)
        if after > budget:
            spent = 0.0 if comp is None else _certified_epsilon(comp, self.delta)
            return BudgetCheck(
                False,
                after,
                budget,
                f"client {client_id!r} has spent epsilon {spent:.4g} (certified, delta {self.delta:g}); the planned "
                f"{planned.steps} steps at q = {planned.sampling_rate:.4g}, "
                f"sigma = {planned.noise_multiplier:.4g} would "
                f"bring it to {after:.4g} > budget {budget:g}",
            )
        return BudgetCheck(True, after, budget)

    def report(self, accountant: str | None = None) -> list[dict[str, object]]:
        """One row per client: rounds and steps trained, one-off releases (entries of kind ``"release"``),
        examples, epsilon (estimate) and certified epsilon (both composing everything)."""
        rows = []
        for client in self.clients:
            entries = [e for e in self if e.client_id == client]
            trained = [e for e in entries if e.kind == "train"]
            rows.append(
                {
                    "id": client,
                    "rounds": len(trained),
                    "steps": sum(e.event.steps for e in trained),
                    "releases": len(entries) - len(trained),
                    "examples": entries[-1].examples,
                    "epsilon": self.epsilon(client, accountant),
                    "epsilon_certified": self.certified_epsilon(client),
                }
            )
        return rows


def _certified_epsilon(composition: Composition, delta: float) -> float:
    """The certified (``pld``) epsilon of a composition, memoised on what determines it.

    Steps commute, so a composition's epsilon depends only on its total steps per distinct
    ``(q, sigma)`` (:meth:`Composition.grouped`): the prospective check before a round and the
    record after it, or a server checking many clients with the same plan, pay for one PLD
    computation instead of one per query.
    """
    return _certified_grouped(tuple(sorted(composition.grouped().items())), delta)


@functools.lru_cache(maxsize=1024)
def _certified_grouped(grouped: tuple[tuple[tuple[float, float], int], ...], delta: float) -> float:
    events = tuple(SubsampledGaussianEvent(q, sigma, steps) for (q, sigma), steps in grouped)
    return certifier().get_epsilon(Composition(events), delta)
