"""Server optimizers: Flower's FedAvg, FedAvgM, FedAdam and FedYogi behind the ledger strategy.

Real Flower strategies and Messages (a small in-memory grid, no model, no Ray): each optimizer's new
global arrays are checked against its update rule computed here in numpy, and its state survives a
checkpoint so that a resumed run continues exactly as the uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import flower_fakes
import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedYogi

from fedtune.config import RunConfig
from fedtune.privacy.ledger import PrivacyLedger
from fedtune.protocol import to_record
from fedtune.server.app import Checkpointer, resume_run
from fedtune.server.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from fedtune.server.optimizers import load_strategy_state, make_strategy, strategy_state
from fedtune.server.run import PlainRounds, RoundResult, RunInterrupted, ServerCallback, ServerRun
from fedtune.server.strategy import LedgerStrategy


@pytest.fixture(autouse=True)
def _task_identity(flower_task_identity: None) -> None:
    """Messages built here need Flower's task identity (see tests/conftest.py)."""


NODES = (1, 2, 3)
EXAMPLES = {1: 10, 2: 30, 3: 60}
SHAPES = {
    "base_model.model.encoder.layer.0.attention.self.query.lora_A.weight": (2, 3),
    "base_model.model.encoder.layer.0.attention.self.query.lora_B.weight": (3, 2),
    "base_model.model.classifier.weight": (4,),
}
START = {k: np.random.default_rng(7).normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
BETA_2, TAU = 0.99, 1e-3  # Flower's defaults for FedAdam and FedYogi, which fedtune keeps

# name -> (server_learning_rate, server_momentum): momentum > 0 and a learning rate != 1 throughout
SETTINGS = {"fedavg": (1.0, 0.0), "fedavgm": (0.7, 0.9), "fedadam": (0.05, 0.9), "fedyogi": (0.05, 0.5)}
STATEFUL = ("fedavgm", "fedadam", "fedyogi")


def update(rnd: int, node: int) -> dict[str, np.ndarray]:
    """What ``node`` sends back in round ``rnd`` (fixed, known arrays)."""
    rng = np.random.default_rng(100 * rnd + node)
    return {k: rng.normal(0.5, 1.0, size=s).astype(np.float32) for k, s in SHAPES.items()}


def FakeGrid(nodes: Iterable[int] = NODES) -> flower_fakes.FakeGrid:  # noqa: N802 - reads as the class it builds
    """A grid of ``nodes`` that answer every train message with :func:`update` and their example counts."""
    return flower_fakes.FakeGrid(nodes, update, EXAMPLES)


def config(name: str, **changes: Any) -> RunConfig:
    lr, mu = SETTINGS[name]
    settings: dict[str, Any] = {"clients": 3, "server_optimizer": name, "server_learning_rate": lr}
    settings["server_momentum"] = mu
    return RunConfig(**{**settings, **changes})


def ledger_strategy(name: str) -> LedgerStrategy:
    cfg = config(name)
    return LedgerStrategy(make_strategy(cfg, cfg.clients), PrivacyLedger(None, 1e-5))


def numpy_state(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: a.numpy() for k, a in record.items()}


def drive(
    strategy: LedgerStrategy, rounds: Iterable[int], arrays: dict[str, np.ndarray] = START
) -> list[dict[str, np.ndarray]]:
    """Play ``rounds`` through configure_train / aggregate_train; the global arrays after each."""
    grid = FakeGrid()
    record = to_record(arrays)
    history = []
    for rnd in rounds:
        messages = list(strategy.configure_train(rnd, record, ConfigRecord({}), grid))  # type: ignore[arg-type]
        assert sorted(m.metadata.dst_node_id for m in messages) == list(NODES)
        new, _ = strategy.aggregate_train(rnd, grid.answer(messages))
        assert new is not None
        record = new
        history.append(numpy_state(record))
    return history


def expected(name: str, rounds: int) -> list[dict[str, np.ndarray]]:
    """The update rules, in float64, independently of Flower (see fedtune.server.optimizers)."""
    lr, mu = SETTINGS[name]
    total = sum(EXAMPLES.values())
    x = {k: v.astype(np.float64) for k, v in START.items()}
    zeros = {k: np.zeros_like(v) for k, v in x.items()}
    momentum, m, v = dict(zeros), dict(zeros), dict(zeros)
    history = []
    for t in range(1, rounds + 1):
        updates = {n: update(t, n) for n in NODES}
        mean = {k: np.sum([EXAMPLES[n] * updates[n][k].astype(np.float64) for n in NODES], axis=0) / total for k in x}
        for k in SHAPES:
            if name == "fedavg":
                x[k] = mean[k]
            elif name == "fedavgm":  # Hsu et al. 2019: heavy ball on the pseudo-gradient x_t - mean
                momentum[k] = mu * momentum[k] + (x[k] - mean[k])
                x[k] = x[k] - lr * momentum[k]
            else:  # Reddi et al. 2021
                delta = mean[k] - x[k]
                m[k] = mu * m[k] + (1 - mu) * delta
                if name == "fedadam":
                    v[k] = BETA_2 * v[k] + (1 - BETA_2) * delta**2
                    eta = lr * math.sqrt(1 - BETA_2 ** (t + 1)) / (1 - mu ** (t + 1))  # Flower's bias correction
                else:
                    v[k] = v[k] - (1 - BETA_2) * delta**2 * np.sign(v[k] - delta**2)
                    eta = lr  # Flower's FedYogi has no bias correction
                x[k] = x[k] + eta * m[k] / (np.sqrt(v[k]) + TAU)
        history.append({k: a.copy() for k, a in x.items()})
    return history


# -- the update rules ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["fedavg", "fedavgm", "fedadam", "fedyogi"])
def test_each_server_optimizer_follows_its_update_rule(name: str) -> None:
    strategy = ledger_strategy(name)
    kind = {"fedavg": FedAvg, "fedavgm": FedAvgM, "fedadam": FedAdam, "fedyogi": FedYogi}[name]
    assert type(strategy.inner) is kind
    got, want = drive(strategy, range(1, 4)), expected(name, 3)
    for rnd, (g, w) in enumerate(zip(got, want, strict=True), start=1):
        assert list(g) == list(SHAPES)
        for key in SHAPES:
            np.testing.assert_allclose(g[key], w[key], rtol=1e-4, atol=1e-6, err_msg=f"{name}, round {rnd}, {key}")
    if name != "fedavg":  # the server optimizer made a difference
        key = next(iter(SHAPES))
        assert not np.allclose(got[-1][key], expected("fedavg", 3)[-1][key], rtol=1e-3)
    assert strategy.ledger.clients == [] and strategy.totals["c3"] == {"rounds": 3, "steps": 3}


@pytest.mark.parametrize("name", ["fedavg", "fedavgm", "fedadam", "fedyogi"])
def test_a_centralized_run_gets_plain_fedavg(name: str) -> None:
    cfg = config(name, clients=1)
    strategy = LedgerStrategy(make_strategy(cfg, 1), PrivacyLedger(None, 1e-5))
    assert type(strategy.inner) is FedAvg
    grid = FakeGrid(nodes=[2])
    record = to_record(START)
    for rnd in (1, 2):
        messages = list(strategy.configure_train(rnd, record, ConfigRecord({}), grid))  # type: ignore[arg-type]
        new, _ = strategy.aggregate_train(rnd, grid.answer(messages))
        assert new is not None
        record = new
        for key, value in update(rnd, 2).items():  # the one client's model, whatever server_optimizer says
            np.testing.assert_array_equal(record[key].numpy(), value)


# -- state: checkpoint and resume ------------------------------------------------------------------


@pytest.mark.parametrize("name", STATEFUL)
def test_state_survives_a_checkpoint_and_the_next_round_is_unchanged(name: str, tmp_path: Path) -> None:
    strategy = ledger_strategy(name)
    after_two = drive(strategy, (1, 2))[-1]
    state = strategy_state(strategy)
    slots = {"fedavgm": ["current_arrays", "momentum_vector"]}.get(name, ["current_arrays", "m_t", "v_t"])
    assert sorted(state) == slots and all(list(arrays) == list(SHAPES) for arrays in state.values())
    save_checkpoint(tmp_path, Checkpoint(2, after_two, [], {}, state))
    loaded = load_checkpoint(tmp_path)
    assert loaded is not None and sorted(loaded.server_optimizer) == slots
    for slot, arrays in state.items():
        for key, value in arrays.items():
            got = loaded.server_optimizer[slot][key]
            assert got.dtype == value.dtype
            np.testing.assert_array_equal(got, value)

    fresh = ledger_strategy(name)
    load_strategy_state(fresh, loaded.server_optimizer)
    uninterrupted = drive(strategy, [3], after_two)[0]
    resumed = drive(fresh, [3], loaded.arrays)[0]
    for key in SHAPES:
        np.testing.assert_array_equal(resumed[key], uninterrupted[key])
        np.testing.assert_allclose(resumed[key], expected(name, 3)[-1][key], rtol=1e-4, atol=1e-6)
    dropped = drive(ledger_strategy(name), [3], loaded.arrays)[0]  # a resume that forgets the state
    assert not all(np.allclose(dropped[k], uninterrupted[k], rtol=1e-4, atol=1e-6) for k in SHAPES)


class StopAfter(ServerCallback):
    """Asks the run to stop after round ``last`` (as Ctrl-C does)."""

    def __init__(self, last: int) -> None:
        self.last = last

    def on_round_end(self, run: ServerRun, row: dict[str, Any], result: RoundResult | None) -> None:
        if result is not None and result.round == self.last:
            run.stop.set()


def server_run(name: str, callbacks: list[ServerCallback]) -> ServerRun:
    return ServerRun(
        config=config(name, rounds=3),
        strategy=ledger_strategy(name),
        grid=FakeGrid(),  # type: ignore[arg-type]
        arrays=to_record(START),
        evaluate=lambda arrays: {"accuracy": 0.5},
        make_row=lambda run, metrics, result: {"round": result.round if result else 0, "seconds": 0.0, **metrics},
        rounds=PlainRounds(timeout=5.0),
        callbacks=callbacks,
        stop=threading.Event(),
    )


@pytest.mark.parametrize("name", STATEFUL)
def test_a_resumed_run_continues_exactly_as_the_uninterrupted_one(name: str, tmp_path: Path) -> None:
    uninterrupted = server_run(name, []).run()

    first = server_run(name, [Checkpointer(tmp_path), StopAfter(2)])
    with pytest.raises(RunInterrupted):
        first.run()
    assert sorted(p.name for p in tmp_path.glob("*.npz")) == ["arrays-r0002.npz", "server-optimizer-r0002.npz"]
    checkpoint = load_checkpoint(tmp_path)
    assert checkpoint is not None and checkpoint.round == 2

    resumed = server_run(name, [Checkpointer(tmp_path)])
    resume_run(resumed, checkpoint)  # what run_server(..., resume=True) does
    assert resumed.next_round == 3  # FedAdam's eta_t depends on it
    resumed.run()
    assert [r["round"] for r in resumed.rows] == [0, 1, 2, 3]
    for key in SHAPES:
        np.testing.assert_array_equal(resumed.arrays[key].numpy(), uninterrupted.arrays[key].numpy())
    end, want = strategy_state(resumed.strategy), strategy_state(uninterrupted.strategy)
    assert sorted(end) == sorted(want)
    for slot in want:
        for key in SHAPES:
            np.testing.assert_array_equal(end[slot][key], want[slot][key])
    assert sorted(p.name for p in tmp_path.glob("*.npz")) == ["arrays-r0003.npz", "server-optimizer-r0003.npz"]


def test_a_fedavg_checkpoint_keeps_the_old_format(tmp_path: Path) -> None:
    server_run("fedavg", [Checkpointer(tmp_path)]).run()
    state = json.loads((tmp_path / "state.json").read_text())
    assert sorted(state) == ["arrays", "config", "metrics", "round", "schema"] and state["round"] == 3
    assert [p.name for p in tmp_path.glob("*.npz")] == ["arrays-r0003.npz"]


def test_an_old_checkpoint_without_optimizer_state_still_loads_and_resumes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    arrays: dict[str, Any] = drive(ledger_strategy("fedadam"), (1,))[0]
    np.savez(tmp_path / "arrays-r0001.npz", **arrays)  # what fedtune wrote before server optimizers had state
    rows = [{"round": 0, "seconds": 0.0, "accuracy": 0.5}, {"round": 1, "seconds": 0.0, "accuracy": 0.5}]
    old = {"schema": "fedtune.checkpoint/1", "round": 1, "arrays": "arrays-r0001.npz", "metrics": rows}
    (tmp_path / "state.json").write_text(json.dumps({**old, "config": {"task": "sst2"}}))
    checkpoint = load_checkpoint(tmp_path)
    assert checkpoint is not None and checkpoint.server_optimizer == {} and checkpoint.round == 1

    run = server_run("fedadam", [])
    with caplog.at_level(logging.WARNING, logger="fedtune.server.app"):
        resume_run(run, checkpoint)
    assert "holds no fedadam state" in caplog.text
    run.run()
    assert [r["round"] for r in run.rows] == [0, 1, 2, 3]


def test_a_crash_before_the_commit_keeps_the_previous_optimizer_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedtune.server import checkpoint as ckpt

    strategy = ledger_strategy("fedyogi")
    first = drive(strategy, (1,))[0]
    saved = strategy_state(strategy)
    save_checkpoint(tmp_path, Checkpoint(1, first, [], {}, saved))
    second = drive(strategy, (2,), first)[0]

    def crash(path: object, data: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "atomic_write_json", crash)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, Checkpoint(2, second, [], {}, strategy_state(strategy)))
    loaded = load_checkpoint(tmp_path)
    assert loaded is not None and loaded.round == 1
    for key in SHAPES:
        np.testing.assert_array_equal(loaded.server_optimizer["v_t"][key], saved["v_t"][key])


def test_state_of_another_optimizer_is_refused() -> None:
    adam = ledger_strategy("fedadam")
    drive(adam, (1,))
    with pytest.raises(ValueError, match="'m_t', 'v_t'.*FedAvgM"):
        load_strategy_state(ledger_strategy("fedavgm"), strategy_state(adam))
    with pytest.raises(ValueError, match="FedAvg does not keep"):
        load_strategy_state(ledger_strategy("fedavg"), strategy_state(adam))


@pytest.mark.parametrize("name", STATEFUL)
def test_loading_a_snapshot_undoes_an_aggregation(name: str) -> None:
    """A round that does not count (a quorum retry) can be undone: snapshot, aggregate, load the snapshot."""
    clean, retried = ledger_strategy(name), ledger_strategy(name)
    after_one = drive(clean, (1,))[0]
    drive(retried, (1,))
    want = drive(clean, (2,), after_one)[0]
    snapshot = strategy_state(retried)
    drive(retried, (2,), after_one)  # an attempt that does not count
    load_strategy_state(retried, snapshot)
    got = drive(retried, (2,), after_one)[0]
    for key in SHAPES:
        np.testing.assert_array_equal(got[key], want[key])


# -- settings --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "setting, value",
    [
        ("server_optimizer", "sgd"),
        ("server_momentum", 1.0),
        ("server_momentum", -0.1),
        ("server_learning_rate", 0),
        ("server_learning_rate", math.inf),
        ("server_learning_rate", math.nan),
    ],
)
def test_run_config_refuses_bad_server_settings(setting: str, value: Any) -> None:
    with pytest.raises(ValueError, match=rf"{setting}.*got {repr(value)}"):
        RunConfig(clients=3, **{setting: value})
