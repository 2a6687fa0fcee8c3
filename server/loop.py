"""The federated run: one readable orchestration loop (cf. Flower's ``Strategy.start``).

Unlike ``Strategy.start`` it can begin at any round (``--resume``), ends early when no client can
train within its budget, and hands every round's result to a callback that checkpoints it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid

from fedtune.server.strategy import LedgerStrategy

__all__ = ["RoundResult", "run_rounds", "array_bytes"]

log = logging.getLogger(__name__)


def array_bytes(arrays: ArrayRecord) -> int:
    """Payload size of an ArrayRecord in bytes (the adapter and head weights only)."""
    return int(sum(arrays[key].numpy().nbytes for key in arrays.keys()))


@dataclass
class RoundResult:
    """What one round produced."""

    round: int
    arrays: ArrayRecord
    clients_trained: int
    clients_rejected: int
    bytes_sent: int
    bytes_received: int
    seconds: float
    train_metrics: dict[str, Any] = field(default_factory=dict)
    eval_metrics: dict[str, Any] = field(default_factory=dict)


def run_rounds(
    strategy: LedgerStrategy,
    grid: Grid,
    arrays: ArrayRecord,
    *,
    first_round: int,
    last_round: int,
    train_config: ConfigRecord,
    evaluate: Callable[[int, ArrayRecord], dict[str, Any]],
    on_round_end: Callable[[RoundResult], None],
    timeout: float = 3600.0,
) -> ArrayRecord:
    """Run rounds ``first_round..last_round``; returns the final global arrays.

    Each round: the strategy picks the clients that may still train (configure_train), the grid
    sends them the global arrays and the round config, the strategy validates, records and
    aggregates the replies (aggregate_train), the server evaluates centrally, and ``on_round_end``
    persists the round (checkpoint, metrics, progress).
    """
    for rnd in range(first_round, last_round + 1):
        start = time.perf_counter()
        messages: list[Message] = list(strategy.configure_train(rnd, arrays, ConfigRecord(dict(train_config)), grid))
        if not messages:
            log.info("round %d: no client can train within its privacy budget; ending the run", rnd)
            break
        rejected_before = len(strategy.rejected)
        replies = list(grid.send_and_receive(messages, timeout=timeout))
        received = sum(array_bytes(r.content.array_records[k]) for r in replies if not r.has_error() for k in r.content.array_records)
        new_arrays, train_metrics = strategy.aggregate_train(rnd, replies)
        if new_arrays is not None:
            arrays = new_arrays
        eval_metrics = evaluate(rnd, arrays)
        result = RoundResult(
            round=rnd,
            arrays=arrays,
            clients_trained=len(replies) - (len(strategy.rejected) - rejected_before),
            clients_rejected=len(strategy.rejected) - rejected_before,
            bytes_sent=array_bytes(arrays) * len(messages),
            bytes_received=received,
            seconds=time.perf_counter() - start,
            train_metrics=dict(train_metrics or {}),
            eval_metrics=eval_metrics,
        )
        on_round_end(result)
    return arrays
