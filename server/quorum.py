"""Rounds with a quorum: what a deployed federation does when clients die or never come.

:class:`QuorumRounds` plays the rounds of a deployed :class:`fedtune.server.run.ServerRun`:

1. Before the first round of a run (also a resumed one) it waits up to ``wait-timeout`` seconds for
   all ``clients`` to connect; it starts with fewer if at least ``min-clients`` are there, and stops
   otherwise. Before a retry it waits for ``min-clients``.
2. A round is sent to every connected client that may still train. A client that dies mid-round is
   reported by the SuperLink once its heartbeats stop (about a minute) and its reply counts as
   rejected, like a malformed or refused one; ``round-timeout`` bounds the wait in any case.
3. The round counts (aggregate, evaluate, checkpoint) if at least ``min-clients`` valid updates
   arrived. Otherwise the global model is left unchanged and the round is tried again, up to
   ``round-retries`` times: clients that already paid for it re-send their stored update (no new
   privacy spend), the others train.
4. If the round still falls short, or no client may train within its budget, the run stops cleanly:
   the last checkpoint stays, and the summary says why (``stop_reason``).

Privacy is recorded however a round ends: every accepted update is in the server's ledger, and
every client recorded its own spend before replying, so a dead client's ledger shows what it spent.
"""

from __future__ import annotations

import logging
import time

from flwr.serverapp import Grid

from fedtune.protocol import DeployOptions
from fedtune.server.optimizers import load_strategy_state, strategy_state
from fedtune.server.run import STOP, RoundResult, Rounds, ServerRun, play_round

__all__ = ["QuorumRounds", "wait_for_nodes"]

log = logging.getLogger(__name__)


def wait_for_nodes(grid: Grid, wanted: int, timeout: float, *, poll: float = 1.0) -> int:
    """Wait up to ``timeout`` seconds until ``wanted`` nodes are connected; returns how many are."""
    deadline = time.monotonic() + timeout
    connected = len(list(grid.get_node_ids()))
    last_logged = -1
    while connected < wanted and time.monotonic() < deadline and not STOP.is_set():
        if connected != last_logged:
            log.info("waiting for clients: %d of %d connected", connected, wanted)
            last_logged = connected
        STOP.wait(poll)
        connected = len(list(grid.get_node_ids()))
    return connected


class QuorumRounds(Rounds):
    """A deployment's rounds under the quorum rules of the module docstring."""

    def __init__(self, options: DeployOptions, expected_clients: int) -> None:
        self.options = options
        self.expected = expected_clients
        self.quorum = options.quorum(expected_clients)
        self._first: int | None = None

    def attempt(self, run: ServerRun, rnd: int) -> RoundResult | None:
        """One try at round ``rnd`` (None: no client can train within its budget); secure aggregation
        overrides it (:class:`fedtune.server.secure.SecureQuorumRounds`)."""
        return play_round(run.strategy, run.grid, run.arrays, rnd, timeout=self.options.round_timeout, stop=run.stop)

    def play(self, run: ServerRun, rnd: int) -> RoundResult | str:
        options, quorum = self.options, self.quorum
        if self._first is None:
            self._first = rnd
        result: RoundResult | None = None
        for attempt in range(options.round_retries + 1):
            wanted = self.expected if (rnd == self._first and attempt == 0) else quorum
            connected = wait_for_nodes(run.grid, wanted, options.wait_timeout)
            if connected < quorum:
                return (
                    f"round {rnd}: only {connected} client(s) connected after waiting {options.wait_timeout:g} s; "
                    f"at least {quorum} needed (min-clients)"
                )
            if connected < wanted:
                log.warning("round %d: starting with %d of %d clients (min-clients %d)", rnd, connected, wanted, quorum)
            before = strategy_state(run.strategy)  # a failed attempt must not move the server optimizer
            result = self.attempt(run, rnd)
            if result is None:
                return f"round {rnd}: " + (
                    run.strategy.exhausted_reason or "no client can train within its privacy budget"
                )
            if result.clients_trained >= quorum:
                return result
            load_strategy_state(run.strategy, before)
            log.warning(
                "round %d, attempt %d of %d: %d valid update(s), %d needed (min-clients); "
                "the global model is unchanged",
                rnd,
                attempt + 1,
                options.round_retries + 1,
                result.clients_trained,
                quorum,
            )
        trained = 0 if result is None else result.clients_trained
        return (
            f"round {rnd}: {trained} valid update(s) after {options.round_retries + 1} attempt(s); "
            f"at least {quorum} needed (min-clients)"
        )
