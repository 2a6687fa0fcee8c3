"""The server run loop: hooks, stops, failed clients; rounds under a quorum (a scripted grid, no network)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity

from fedtune.config import RunConfig
from fedtune.privacy.ledger import PrivacyLedger
from fedtune.protocol import PRIVACY_KEY, DeployOptions
from fedtune.server.quorum import QuorumRounds
from fedtune.server.run import RoundResult, ServerCallback, ServerRun
from fedtune.server.strategy import LedgerStrategy

START = ArrayRecord({"w": Array(np.zeros(3, dtype=np.float32))})

# A node's answer in one attempt: "ok" (a valid update of all ones), "error" (what the SuperLink sends for
# a node whose heartbeats stopped), "nan" (a malformed update), "silent" (no reply before the timeout).
Script = dict[int, list[str]]


@pytest.fixture(autouse=True)
def _task_identity(flower_task_identity: None) -> None:
    """Messages built here need Flower's task identity (see tests/conftest.py)."""


class ScriptedGrid:
    """A Grid whose nodes answer each attempt as scripted; nodes listed in ``gone_after`` disconnect."""

    def __init__(self, script: Script, connected: Callable[[int], list[int]] | None = None) -> None:
        self.script = script
        self.attempt = 0
        self.sent: list[list[int]] = []
        self._connected = connected or (lambda attempt: sorted(script))

    def get_node_ids(self) -> Iterable[int]:
        return self._connected(self.attempt)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        messages = list(messages)
        for index, message in enumerate(messages):
            message.metadata.__dict__["_message_id"] = f"a{self.attempt}-m{index}"
        self._outbox = self._answer(messages)
        return [m.metadata.message_id for m in messages]

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        wanted = set(message_ids)
        replies = [r for r in self._outbox if r.metadata.reply_to_message_id in wanted]
        self._outbox = [r for r in self._outbox if r not in replies]  # each reply is delivered once, like Flower's grid
        return replies

    def _answer(self, messages: list[Message]) -> list[Message]:
        self.sent.append(sorted(m.metadata.dst_node_id for m in messages))
        replies = []
        for message in messages:
            node = message.metadata.dst_node_id
            plan = self.script[node]
            answer = plan[min(self.attempt, len(plan) - 1)]
            if answer == "silent":
                continue
            TaskIdentity.node_id = node
            if answer == "error":
                replies.append(Message(Error(code=0, reason="node unavailable: heartbeats stopped"), reply_to=message))
            else:
                value = np.full(3, np.nan if answer == "nan" else 1.0, dtype=np.float32)
                privacy = ConfigRecord(
                    {
                        "client-id": f"c{node}",
                        "status": "ok",
                        "sampling-rate": 0.1,
                        "noise-multiplier": 1.0,
                        "steps": 5,
                        "examples": 10,
                    }
                )
                replies.append(
                    Message(
                        RecordDict(
                            {
                                "arrays": ArrayRecord({"w": Array(value)}),
                                "metrics": MetricRecord({"num-examples": 10}),
                                PRIVACY_KEY: privacy,
                            }
                        ),
                        reply_to=message,
                    )
                )
            TaskIdentity.node_id = 0
        self.attempt += 1
        return replies


def run(
    grid: ScriptedGrid, *, clients: int, min_clients: int, retries: int = 1, rounds: int = 1
) -> tuple[ArrayRecord, str | None, list[RoundResult], LedgerStrategy]:
    strategy = LedgerStrategy(
        FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=1, min_available_nodes=1),
        PrivacyLedger(None, 1e-5),
    )
    done: list[RoundResult] = []
    options = DeployOptions(
        deployed=True, min_clients=min_clients, round_retries=retries, wait_timeout=0.05, round_timeout=1.0
    )

    class Record(ServerCallback):
        def on_round_end(self, run: ServerRun, row: dict[str, object], result: RoundResult | None) -> None:
            if result is not None:
                done.append(result)

    server_run = ServerRun(
        config=RunConfig(clients=clients, rounds=rounds),
        strategy=strategy,
        grid=grid,  # type: ignore[arg-type]
        arrays=START,
        evaluate=lambda arrays: {"accuracy": 0.5},
        make_row=lambda run, metrics, result: {"round": result.round if result else 0, **metrics},
        rounds=QuorumRounds(options, clients),
        callbacks=[Record()],
    ).run()
    final, reason = server_run.arrays, server_run.stop_reason
    return final, reason, done, strategy


def test_a_dead_client_does_not_stop_the_round_when_enough_remain() -> None:
    final, reason, done, strategy = run(ScriptedGrid({1: ["ok"], 2: ["ok"], 3: ["error"]}), clients=3, min_clients=2)
    assert reason is None and len(done) == 1
    assert done[0].clients_trained == 2 and done[0].clients_rejected == 1
    np.testing.assert_allclose(final["w"].numpy(), 1.0)
    assert strategy.ledger.clients == ["c1", "c2"]  # the dead client's reply never arrived: nothing recorded for it
    assert "unavailable" in str(strategy.rejected[0]["reason"])


def test_a_round_short_of_the_quorum_is_retried() -> None:
    grid = ScriptedGrid({1: ["ok"], 2: ["silent", "ok"]})
    final, reason, done, strategy = run(grid, clients=2, min_clients=2, retries=1)
    assert reason is None and len(grid.sent) == 2 and grid.sent[1] == [1, 2]
    assert len(done) == 1 and done[0].clients_trained == 2  # the retry's result is the round's
    assert sorted(e.key for e in strategy.ledger) == [("c1", 1), ("c2", 1)]  # c1 answered twice, counted once


def test_the_run_stops_cleanly_when_the_quorum_is_never_met() -> None:
    grid = ScriptedGrid({1: ["ok"], 2: ["nan"]})
    final, reason, done, _ = run(grid, clients=2, min_clients=2, retries=1, rounds=3)
    assert done == []  # nothing checkpointed: the round did not count
    assert (
        reason is not None
        and "round 1" in reason
        and "1 valid update(s) after 2 attempt(s)" in reason
        and "at least 2" in reason
    )
    np.testing.assert_allclose(final["w"].numpy(), 0.0)  # the global model is unchanged


def test_the_run_stops_when_too_few_clients_connect() -> None:
    grid = ScriptedGrid({1: ["ok"], 2: ["ok"]}, connected=lambda attempt: [1])
    _, reason, done, _ = run(grid, clients=2, min_clients=2)
    assert done == [] and grid.sent == []
    assert reason is not None and "only 1 client(s) connected" in reason


def test_fewer_clients_than_expected_start_when_the_minimum_is_there() -> None:
    grid = ScriptedGrid({1: ["ok"], 2: ["ok"]}, connected=lambda attempt: [1])
    _, reason, done, _ = run(grid, clients=2, min_clients=1, rounds=2)
    assert reason is None and [r.round for r in done] == [1, 2] and grid.sent == [[1], [1]]


def test_min_clients_above_clients_is_refused() -> None:
    with pytest.raises(ValueError, match="min-clients 3 is larger than clients 2"):
        DeployOptions(min_clients=3).quorum(2)


# -- the run loop itself (a simulation's rounds) --------------------------------------------------


class OutOfMemoryGrid(ScriptedGrid):
    """Node 2's worker is killed by Ray's memory monitor: Flower relays it as an error reply."""

    def _answer(self, messages: list[Message]) -> list[Message]:
        replies = super()._answer(messages)
        for index, reply in enumerate(replies):
            if reply.has_error():
                oom = Message(
                    Error(
                        code=0,
                        reason="<class 'ray.exceptions.OutOfMemoryError'>:<'Task was killed due to "
                        "the node running low on memory.'>",
                    ),
                    reply_to=messages[index],
                )
                replies[index] = oom
        return replies


def _simulation(grid: ScriptedGrid, rounds: int, callbacks: list[ServerCallback]) -> ServerRun:
    from fedtune.server.run import PlainRounds

    strategy = LedgerStrategy(
        FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=1, min_available_nodes=1),
        PrivacyLedger(None, 1e-5),
    )
    return ServerRun(
        config=RunConfig(clients=2, rounds=rounds),
        strategy=strategy,
        grid=grid,  # type: ignore[arg-type]
        arrays=START,
        evaluate=lambda arrays: {"accuracy": float(arrays["w"].numpy().mean())},
        make_row=lambda run, metrics, result: {"round": result.round if result else 0, **metrics},
        rounds=PlainRounds(timeout=1.0),
        callbacks=callbacks,
    )


def test_hooks_run_in_order_and_rows_are_the_evaluated_rounds() -> None:
    calls: list[str] = []

    class Trace(ServerCallback):
        def on_run_start(self, run: ServerRun) -> None:
            calls.append("start")

        def stop_reason(self, run: ServerRun) -> str | None:
            calls.append(f"check {run.next_round}")
            return "budget spent" if run.next_round == 3 else None

        def on_round_end(self, run: ServerRun, row: dict[str, object], result: RoundResult | None) -> None:
            calls.append(f"end {row['round']}")

        def on_run_end(self, run: ServerRun) -> None:
            calls.append("finish")

    run = _simulation(ScriptedGrid({1: ["ok"], 2: ["ok"]}), rounds=5, callbacks=[Trace()]).run()
    assert calls == ["start", "end 0", "check 1", "end 1", "check 2", "end 2", "check 3", "finish"]
    assert run.stop_reason == "budget spent" and not run.failed
    assert [r["accuracy"] for r in run.rows] == [0.0, 1.0, 1.0]  # round 0 evaluates the initial model


def test_a_client_out_of_memory_stops_a_simulation_and_names_the_knobs() -> None:
    run = _simulation(OutOfMemoryGrid({1: ["ok"], 2: ["error"]}), rounds=3, callbacks=[]).run()
    assert run.failed and run.next_round == 1  # the round did not count
    assert run.stop_reason is not None and "ran out of memory" in run.stop_reason
    assert "--physical-batch-size" in run.stop_reason and "--cpus-per-client" in run.stop_reason


def test_stop_ends_the_run_between_rounds_and_keeps_what_finished() -> None:
    from fedtune.server.run import RunInterrupted

    stop = threading.Event()
    rows: list[int] = []

    class StopAfterRoundOne(ServerCallback):
        def on_round_end(self, run: ServerRun, row: dict[str, object], result: RoundResult | None) -> None:
            rows.append(int(row["round"]))  # type: ignore[call-overload]
            if result is not None:
                stop.set()  # as Ctrl-C does

    run = _simulation(ScriptedGrid({1: ["ok"], 2: ["ok"]}), rounds=3, callbacks=[StopAfterRoundOne()])
    run.stop = stop
    with pytest.raises(RunInterrupted):
        run.run()
    assert rows == [0, 1]
