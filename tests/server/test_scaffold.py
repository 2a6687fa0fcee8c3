"""SCAFFOLD's server side (fedtune.server.scaffold.Scaffold) around Flower's real strategies: the global
control variate each message carries is the example-weighted mean of the clients' latest variates,
the wrapped strategy aggregates the updates exactly as without SCAFFOLD, a bad variate is rejected
with its reply, and the variates survive a checkpoint (real Flower Messages, an in-memory grid)."""

from __future__ import annotations

import math
from collections.abc import Iterable

import flower_fakes
import numpy as np
import pytest
from flwr.app import ConfigRecord
from flwr.serverapp.strategy import FedAvg

from fedtune.config import RunConfig
from fedtune.privacy.ledger import PrivacyLedger
from fedtune.protocol import to_record
from fedtune.server.optimizers import load_strategy_state, make_strategy, strategy_state
from fedtune.server.scaffold import Scaffold
from fedtune.server.strategy import LedgerStrategy


@pytest.fixture(autouse=True)
def _task_identity(flower_task_identity: None) -> None:
    """Messages built here need Flower's task identity (see tests/conftest.py)."""


NODES = (1, 2, 3)
EXAMPLES = {1: 10, 2: 30, 3: 60}
SHAPES = {"lora_B": (3, 2), "head": (4,)}
START = {k: np.zeros(s, dtype=np.float32) for k, s in SHAPES.items()}


def update(rnd: int, node: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(100 * rnd + node)
    return {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}


def control(rnd: int, node: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1000 + 100 * rnd + node)
    return {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}


def grid(nodes: Iterable[int] = NODES, answer_control: flower_fakes.Answer | None = control) -> flower_fakes.FakeGrid:
    return flower_fakes.FakeGrid(nodes, update, EXAMPLES, control=answer_control)


def weighted(arrays: dict[int, dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    total = sum(EXAMPLES[n] for n in arrays)
    return {k: sum(EXAMPLES[n] / total * a[k] for n, a in arrays.items()) for k in SHAPES}


def play(strategy: LedgerStrategy, fake: flower_fakes.FakeGrid, rounds: int, start: int = 1) -> dict[str, np.ndarray]:
    record = to_record(START)
    for rnd in range(start, start + rounds):
        messages = list(strategy.configure_train(rnd, record, ConfigRecord({}), fake))  # type: ignore[arg-type]
        new, _ = strategy.aggregate_train(rnd, fake.answer(messages))
        assert new is not None
        record = new
    return {k: record[k].numpy() for k in record.keys()}


def test_messages_carry_the_weighted_mean_of_the_latest_variates_and_the_updates_aggregate_as_fedavg() -> None:
    strategy = LedgerStrategy(Scaffold(FedAvg(fraction_evaluate=0.0)), PrivacyLedger(None, 1e-5, math.inf))
    fake = grid()
    final = play(strategy, fake, rounds=3)
    for node in NODES:  # round 1: c = 0
        assert all(np.all(v == 0) for v in fake.received_controls[(1, node)].values())
    for rnd in (2, 3):  # then the example-weighted mean of round rnd - 1's variates (10/100, 30/100, 60/100)
        expected = weighted({n: control(rnd - 1, n) for n in NODES})
        for node in NODES:
            got = fake.received_controls[(rnd, node)]
            for key in SHAPES:
                np.testing.assert_allclose(got[key], expected[key], rtol=1e-6, atol=1e-7)
    # the model aggregate is FedAvg's weighted mean of round 3's updates: SCAFFOLD does not touch it
    expected_model = weighted({n: update(3, n) for n in NODES})
    for key in SHAPES:
        np.testing.assert_allclose(final[key], expected_model[key], rtol=1e-6, atol=1e-7)


def test_a_client_that_did_not_report_keeps_its_last_variate_in_the_mean() -> None:
    scaffold = Scaffold(FedAvg(fraction_evaluate=0.0))
    strategy = LedgerStrategy(scaffold, PrivacyLedger(None, 1e-5, math.inf))
    play(strategy, grid(), rounds=1)
    play(strategy, grid(nodes=(1, 2)), rounds=1, start=2)  # node 3 misses round 2
    c = scaffold.global_control(to_record(START))
    expected = weighted({1: control(2, 1), 2: control(2, 2), 3: control(1, 3)})
    for key in SHAPES:
        np.testing.assert_allclose(c[key].numpy(), expected[key], rtol=1e-6, atol=1e-7)


def test_a_malformed_variate_rejects_its_reply_and_a_stray_record_is_rejected_without_scaffold() -> None:
    def bad(rnd: int, node: int) -> dict[str, np.ndarray]:
        out = control(rnd, node)
        if node == 2:
            out["head"] = np.full(4, np.nan, dtype=np.float32)
        return out

    scaffold = Scaffold(FedAvg(fraction_evaluate=0.0))
    strategy = LedgerStrategy(scaffold, PrivacyLedger(None, 1e-5, math.inf))
    final = play(strategy, grid(answer_control=bad), rounds=1)
    assert [r["node"] for r in strategy.rejected] == [2]
    assert "non-finite" in str(strategy.rejected[0]["reason"])
    assert set(scaffold.controls) == {"c1", "c3"}
    expected = {k: (10 * update(1, 1)[k] + 60 * update(1, 3)[k]) / 70 for k in SHAPES}
    for key in SHAPES:
        np.testing.assert_allclose(final[key], expected[key], rtol=1e-6, atol=1e-7)
    # without SCAFFOLD a reply with a second ArrayRecord is refused with the reason, never aggregated
    plain = LedgerStrategy(FedAvg(fraction_evaluate=0.0), PrivacyLedger(None, 1e-5, math.inf))
    fake = grid()
    messages = list(plain.configure_train(1, to_record(START), ConfigRecord({}), fake))  # type: ignore[arg-type]
    assert plain.aggregate_train(1, fake.answer(messages)) == (None, None)
    assert all("expected one ArrayRecord, got 2" in str(r["reason"]) for r in plain.rejected)


def test_the_variates_survive_a_checkpoint_and_the_next_round_is_unchanged() -> None:
    config = RunConfig(task="sst2", clients=3, rounds=4, server_optimizer="fedavgm", server_momentum=0.9, scaffold=True)
    first = LedgerStrategy(Scaffold(make_strategy(config, 3)), PrivacyLedger(None, 1e-5, math.inf))
    play(first, grid(), rounds=2)
    saved = strategy_state(first)
    assert {"scaffold:c1", "scaffold:c2", "scaffold:c3", "scaffold-examples", "momentum_vector"} <= set(saved)
    again = LedgerStrategy(Scaffold(make_strategy(config, 3)), PrivacyLedger(None, 1e-5, math.inf))
    load_strategy_state(again, saved)
    fake_a, fake_b = grid(), grid()
    record = to_record(START)
    for strategy, fake in ((first, fake_a), (again, fake_b)):
        messages = list(strategy.configure_train(3, record, ConfigRecord({}), fake))  # type: ignore[arg-type]
        strategy.aggregate_train(3, fake.answer(messages))
    for node in NODES:
        for key in SHAPES:
            np.testing.assert_array_equal(
                fake_a.received_controls[(3, node)][key], fake_b.received_controls[(3, node)][key]
            )
    # loading the state of a run without SCAFFOLD resets the variates; a variate without its count is refused
    load_strategy_state(again, {k: v for k, v in saved.items() if not k.startswith("scaffold")})
    assert again.inner.controls == {}  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="without example counts"):
        load_strategy_state(again, {k: v for k, v in saved.items() if k != "scaffold-examples"})


@pytest.mark.parametrize(
    "setting", [{"secure_aggregation": True}, {"client_level_epsilon": 4.0}], ids=["secure", "client-level"]
)
def test_scaffold_is_refused_where_its_variates_would_leave_their_guarantee(setting: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="scaffold sends each client's control variate to the server in the clear"):
        RunConfig(task="sst2", clients=4, rounds=2, epsilon=8.0, scaffold=True, **setting)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="scaffold must be true or false"):
        RunConfig(task="sst2", clients=4, rounds=2, scaffold="yes")  # type: ignore[arg-type]
