"""The federated run: one readable loop with named hooks (after pfl-research's ``run`` with callbacks).

::

    run.run()
        callbacks.on_run_start(run)
        for each round r from run.next_round to config.rounds:
            reason = first callbacks.stop_reason(run)         # budget, interruption, a failed client ...
            result = rounds.play(run, r)                       # send, receive, validate, record, aggregate
            metrics = evaluate(result.arrays)                  # central evaluation
            callbacks.on_round_end(run, row, result)           # checkpoint, metrics.csv, plot, summary, log
        callbacks.on_run_end(run)                              # final adapter and summary

Unlike Flower's ``Strategy.start`` the loop can begin at any round (``--resume``), ends early when
no client can train within its budget, stops within seconds when asked (:data:`STOP`, set on Ctrl-C),
and hands every round to callbacks that persist it, so an interrupted run keeps every finished round.

How a round is played is a :class:`Rounds` object: :class:`PlainRounds` (a simulation: all clients,
one attempt) or :class:`fedtune.server.quorum.QuorumRounds` (a deployment: wait for clients, retry
a round short of its quorum); under secure aggregation their counterparts in
:mod:`fedtune.server.secure` play each round with Flower's SecAgg+ workflow.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid

from fedtune.config import RunConfig
from fedtune.server.strategy import LedgerStrategy

__all__ = [
    "STOP",
    "RoundResult",
    "Rounds",
    "PlainRounds",
    "ServerCallback",
    "ServerRun",
    "RunInterrupted",
    "array_bytes",
    "exchange",
    "play_round",
    "failure_reason",
]

log = logging.getLogger(__name__)

#: Set to ask every running federation in this process to stop (``fedtune simulate`` sets it on Ctrl-C).
STOP = threading.Event()

_POLL_SECONDS = 0.2
_OUT_OF_MEMORY = re.compile(r"OutOfMemory|out of memory|low on memory|OOM|MemoryError", re.IGNORECASE)


class RunInterrupted(Exception):
    """The run was asked to stop (:data:`STOP`) before it finished; finished rounds are saved."""


def array_bytes(arrays: ArrayRecord) -> int:
    """Payload size of an ArrayRecord in bytes (the adapter and head weights only)."""
    return int(sum(arrays[key].numpy().nbytes for key in arrays.keys()))


@dataclass
class RoundResult:
    """What one round produced (before central evaluation)."""

    round: int
    arrays: ArrayRecord
    clients_trained: int
    clients_rejected: int
    bytes_sent: int
    bytes_received: int
    seconds: float
    train_metrics: dict[str, Any] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


def exchange(grid: Grid, messages: Sequence[Message], timeout: float, stop: threading.Event = STOP) -> list[Message]:
    """Flower's ``grid.send_and_receive``, but it returns as soon as ``stop`` is set.

    Raises
    ------
    RunInterrupted
        When ``stop`` is set before every reply arrived.
    """
    pending = {mid for mid in grid.push_messages(messages) if mid}
    replies: list[Message] = []
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        if stop.is_set():
            raise RunInterrupted("stopped while waiting for the clients' replies")
        for reply in grid.pull_messages(sorted(pending)):
            replies.append(reply)
            pending.discard(reply.metadata.reply_to_message_id)
        if pending:
            stop.wait(_POLL_SECONDS)
    return replies


def failure_reason(errors: Sequence[str]) -> str:
    """Why a simulated round failed, from the clients' error replies (running out of memory named as such)."""
    memory = [e for e in errors if _OUT_OF_MEMORY.search(e or "")]
    if memory:
        return (
            "a client ran out of memory (Ray's memory monitor ended its worker). Lower the memory per client: "
            "--physical-batch-size 16 (or 8), or run fewer clients at once per machine with a larger "
            f"--cpus-per-client. The error: {memory[0][:300]}"
        )
    return f"{len(errors)} client(s) failed; the first: {errors[0][:500]}"


def play_round(
    strategy: LedgerStrategy, grid: Grid, arrays: ArrayRecord, rnd: int, *, timeout: float, stop: threading.Event = STOP
) -> RoundResult | None:
    """One round: the strategy picks clients, the grid exchanges messages, the strategy aggregates.

    Returns None when no client can train within its privacy budget.
    """
    start = time.perf_counter()
    messages = list(strategy.configure_train(rnd, arrays, ConfigRecord({}), grid))
    if strategy.exhausted:
        return None
    rejected_before = len(strategy.rejected)
    replies = exchange(grid, messages, timeout, stop) if messages else []
    received = sum(
        array_bytes(r.content.array_records[k]) for r in replies if not r.has_error() for k in r.content.array_records
    )
    new_arrays, train_metrics = strategy.aggregate_train(rnd, replies)
    rejected = len(strategy.rejected) - rejected_before
    missing = len(messages) - len(replies)
    errors = [(r.error.reason or "") for r in replies if r.has_error()]
    if missing:
        errors.append(f"{missing} client(s) sent no reply within {timeout:g} s")
    return RoundResult(
        round=rnd,
        arrays=new_arrays if new_arrays is not None else arrays,
        clients_trained=len(replies) - rejected,
        clients_rejected=rejected + missing,
        bytes_sent=array_bytes(arrays) * len(messages),
        bytes_received=received,
        seconds=time.perf_counter() - start,
        train_metrics=dict(train_metrics or {}),
        errors=errors,
    )


class Rounds:
    """How a round is played (hook of :class:`ServerRun`)."""

    def play(self, run: ServerRun, rnd: int) -> RoundResult | str:
        """The round's result, or the reason the run must stop instead."""
        raise NotImplementedError


class PlainRounds(Rounds):
    """A simulation's rounds: every client, one attempt; a client that fails stops the run."""

    def __init__(self, timeout: float = 3600.0) -> None:
        self.timeout = timeout

    def play(self, run: ServerRun, rnd: int) -> RoundResult | str:
        result = play_round(run.strategy, run.grid, run.arrays, rnd, timeout=self.timeout, stop=run.stop)
        if result is None:
            return f"round {rnd}: " + (run.strategy.exhausted_reason or "no client can train within its privacy budget")
        if result.errors:
            run.failed = True
            return f"round {rnd}: " + failure_reason(result.errors)
        return result


class ServerCallback:
    """Named hooks of :class:`ServerRun`; override the ones you need (all do nothing by default)."""

    def on_run_start(self, run: ServerRun) -> None:
        """Before the first round of this process (also of a resumed run)."""

    def stop_reason(self, run: ServerRun) -> str | None:
        """A reason to end the run before round ``run.next_round``, or None to go on."""
        return None

    def on_round_end(self, run: ServerRun, row: dict[str, Any], result: RoundResult | None) -> None:
        """After a round counted and was evaluated (``result`` None: the initial model, round 0)."""

    def on_run_end(self, run: ServerRun) -> None:
        """After the last round, or when the run stopped early (not when it was interrupted)."""


@dataclass
class ServerRun:
    """State and loop of one federated run (see the module docstring).

    Attributes
    ----------
    rows : list of dict
        One row per evaluated round (round 0 is the initial model); what metrics.csv holds.
    stop_reason : str or None
        Why the run ended before its last round.
    failed : bool
        The run stopped because something failed (a client's error), not because it was done or
        out of budget.
    """

    config: RunConfig
    strategy: LedgerStrategy
    grid: Grid
    arrays: ArrayRecord
    evaluate: Callable[[ArrayRecord], dict[str, Any]]
    make_row: Callable[[ServerRun, dict[str, Any], RoundResult | None], dict[str, Any]]
    rounds: Rounds = field(default_factory=PlainRounds)
    callbacks: list[ServerCallback] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)
    stop_reason: str | None = None
    failed: bool = False
    stop: threading.Event = field(default=STOP)
    started: float = field(default_factory=time.perf_counter)
    earlier_seconds: float = 0.0

    @property
    def next_round(self) -> int:
        """The round to play next (after a resume: the one after the last checkpoint)."""
        return int(self.rows[-1]["round"]) + 1 if self.rows else 1

    @property
    def seconds(self) -> float:
        """Wall time of the run so far, resumed parts included."""
        return self.earlier_seconds + time.perf_counter() - self.started

    def _end_round(self, row: dict[str, Any], result: RoundResult | None) -> None:
        self.rows.append(row)
        for callback in self.callbacks:
            callback.on_round_end(self, row, result)

    def _check_stop(self) -> None:
        if self.stop.is_set():
            raise RunInterrupted(f"stopped before round {self.next_round}")

    def run(self) -> ServerRun:
        """Play the remaining rounds with the callbacks; returns ``self``.

        Raises
        ------
        RunInterrupted
            If :attr:`stop` was set; every finished round has been handed to the callbacks.
        """
        for callback in self.callbacks:
            callback.on_run_start(self)
        if not self.rows:
            self._check_stop()
            self._end_round(self.make_row(self, self.evaluate(self.arrays), None), None)
        while self.next_round <= self.config.rounds:
            self._check_stop()
            reasons = (callback.stop_reason(self) for callback in self.callbacks)
            self.stop_reason = next((r for r in reasons if r), None)
            if self.stop_reason:
                break
            outcome = self.rounds.play(self, self.next_round)
            if isinstance(outcome, str):
                self.stop_reason = outcome
                break
            self._check_stop()
            self.arrays = outcome.arrays
            self._end_round(self.make_row(self, self.evaluate(outcome.arrays), outcome), outcome)
        if self.stop_reason:
            log.warning("the run stopped early: %s", self.stop_reason)
        for callback in self.callbacks:
            callback.on_run_end(self)
        return self
