"""Rounds with a quorum: what a deployed federation does when clients die or never come.

:func:`run_with_quorum` drives :func:`fedtune.server.loop.run_rounds` one round at a time:

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
from collections.abc import Callable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid

from fedtune.deployment import DeployOptions
from fedtune.server.loop import RoundResult, run_rounds
from fedtune.server.strategy import LedgerStrategy

__all__ = ["run_with_quorum", "wait_for_nodes"]

log = logging.getLogger(__name__)


def wait_for_nodes(grid: Grid, wanted: int, timeout: float, *, poll: float = 1.0) -> int:
    """Wait up to ``timeout`` seconds until ``wanted`` nodes are connected; returns how many are."""
    deadline = time.monotonic() + timeout
    connected = len(list(grid.get_node_ids()))
    last_logged = -1
    while connected < wanted and time.monotonic() < deadline:
        if connected != last_logged:
            log.info("waiting for clients: %d of %d connected", connected, wanted)
            last_logged = connected
        time.sleep(poll)
        connected = len(list(grid.get_node_ids()))
    return connected


def run_with_quorum(
    strategy: LedgerStrategy,
    grid: Grid,
    arrays: ArrayRecord,
    *,
    first_round: int,
    last_round: int,
    expected_clients: int,
    options: DeployOptions,
    evaluate: Callable[[int, ArrayRecord], dict[str, Any]],
    on_round_end: Callable[[RoundResult], None],
) -> tuple[ArrayRecord, str | None]:
    """Run rounds ``first_round..last_round`` under the quorum rules (module docstring).

    Returns
    -------
    (ArrayRecord, str or None)
        The final global arrays and, if the run stopped early, why.
    """
    quorum = options.quorum(expected_clients)
    for rnd in range(first_round, last_round + 1):
        result: RoundResult | None = None
        for attempt in range(options.round_retries + 1):
            wanted = expected_clients if (rnd == first_round and attempt == 0) else quorum
            connected = wait_for_nodes(grid, wanted, options.wait_timeout)
            if connected < quorum:
                return arrays, _stop(f"round {rnd}: only {connected} client(s) connected after waiting {options.wait_timeout:g} s; "
                                     f"at least {quorum} needed (min-clients)")
            if connected < wanted:
                log.warning("round %d: starting with %d of %d clients (min-clients %d)", rnd, connected, wanted, quorum)
            captured: list[RoundResult] = []
            run_rounds(strategy, grid, arrays, first_round=rnd, last_round=rnd, train_config=ConfigRecord({}),
                       evaluate=evaluate, on_round_end=captured.append, timeout=options.round_timeout)
            if not captured:
                return arrays, _stop(f"round {rnd}: no client can train within its privacy budget")
            result = captured[0]
            if result.clients_trained >= quorum:
                on_round_end(result)
                arrays = result.arrays
                break
            log.warning("round %d, attempt %d of %d: %d valid update(s), %d needed (min-clients); the global model is unchanged",
                        rnd, attempt + 1, options.round_retries + 1, result.clients_trained, quorum)
        else:
            trained = 0 if result is None else result.clients_trained
            return arrays, _stop(f"round {rnd}: {trained} valid update(s) after {options.round_retries + 1} attempt(s); "
                                 f"at least {quorum} needed (min-clients)")
    return arrays, None


def _stop(reason: str) -> str:
    log.error("stopping the run: %s", reason)
    return reason
