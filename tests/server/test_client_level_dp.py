"""Client-level DP (DP-FedAvg): Flower's DP wrapper behind the ledger strategy, accounted by fedtune.

Real Flower strategies and Messages on an in-memory grid (no model, no Ray). What is checked is what
the server actually does to the updates: the clipping of each update to C, the noise it actually adds
(its empirical standard deviation against sigma C / M), who it samples, and what the ledger then says.
"""

from __future__ import annotations

import math
import random
from typing import Any

import flower_fakes
import numpy as np
import pytest
from flwr.app import ConfigRecord
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg, FedAvgM
from scipy import stats

from fedtune.config import RunConfig
from fedtune.privacy.accountants.reference import certifier
from fedtune.privacy.events import Composition
from fedtune.privacy.ledger import PrivacyLedger
from fedtune.protocol import to_record
from fedtune.server.client_dp import (
    UNIFORM_WEIGHT_KEY,
    ClientLevelDP,
    ClientLevelPlan,
    flower_accountant,
    plan_client_level,
    wrap_client_level,
)
from fedtune.server.strategy import LedgerStrategy


@pytest.fixture(autouse=True)
def _task_identity(flower_task_identity: None) -> None:
    """Messages built here need Flower's task identity (see tests/conftest.py)."""


SIZE = 40_000  # parameters: enough to measure the noise's standard deviation within ~1%
KEYS = ("lora_A", "lora_B", "classifier")
START = {
    k: np.random.default_rng(1).normal(size=SIZE // 4 if k != "lora_B" else SIZE // 2).astype(np.float32) for k in KEYS
}


def big_update(rnd: int, node: int) -> dict[str, np.ndarray]:
    """Node ``node`` moves the model by a random direction of norm ``2 * node`` (>= C = 0.5: clipped)."""
    rng = np.random.default_rng(1000 * rnd + node)
    direction = {k: rng.normal(size=a.shape) for k, a in START.items()}
    norm = math.sqrt(sum(float(np.sum(d**2)) for d in direction.values()))
    return {k: (START[k] + 2.0 * node * d / norm).astype(np.float32) for k, d in direction.items()}


def plan(clients: int = 4, per_round: int | None = None, sigma: float = 2.0, clip: float = 0.5) -> ClientLevelPlan:
    return ClientLevelPlan(
        epsilon=50.0,
        delta=1e-5,
        clients=clients,
        clients_per_round=per_round or clients,
        rounds=10,
        clipping_norm=clip,
        noise_multiplier=sigma,
        certified_epsilon=math.nan,
    )


def strategy_for(p: ClientLevelPlan, ledger: PrivacyLedger | None = None, seed: int | None = 0) -> LedgerStrategy:
    fedavg = FedAvg(
        fraction_train=1.0,
        fraction_evaluate=0.0,
        min_train_nodes=1,
        min_available_nodes=1,
        weighted_by_key=UNIFORM_WEIGHT_KEY,
    )
    ledger = ledger or PrivacyLedger(None, 1e-5)
    rng = random.Random(seed) if seed is not None else None
    return LedgerStrategy(ClientLevelDP(fedavg, p, ledger, rng=rng), ledger)


def play(strategy: LedgerStrategy, grid: flower_fakes.FakeGrid, rnd: int) -> tuple[list[int], dict[str, np.ndarray]]:
    """One round: the nodes sampled and the released global arrays."""
    messages = list(strategy.configure_train(rnd, to_record(START), ConfigRecord({}), grid))  # type: ignore[arg-type]
    assert not strategy.exhausted
    nodes = sorted(m.metadata.dst_node_id for m in messages)
    arrays, _ = strategy.aggregate_train(rnd, grid.answer(messages))
    assert arrays is not None
    return nodes, {k: arrays[k].numpy() for k in arrays.keys()}


def clipped_sum(rnd: int, nodes: list[int], clip: float) -> dict[str, np.ndarray]:
    """Sum of the clipped updates, computed here in float64 independently of Flower."""
    total = {k: np.zeros(a.shape) for k, a in START.items()}
    for node in nodes:
        new = big_update(rnd, node)
        delta = {k: new[k].astype(np.float64) - START[k] for k in START}
        norm = math.sqrt(sum(float(np.sum(d**2)) for d in delta.values()))
        for k in START:
            total[k] += delta[k] * min(1.0, clip / norm)
    return total


def noise_of(released: dict[str, np.ndarray], expected_mean: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([(released[k].astype(np.float64) - expected_mean[k]).ravel() for k in START])


# -- the mechanism ---------------------------------------------------------------------------------


def test_every_client_every_round_clips_to_C_and_adds_noise_of_sigma_C_over_K() -> None:
    p = plan(clients=4, sigma=2.0, clip=0.5)
    strategy = strategy_for(p)
    assert isinstance(strategy.inner, DifferentialPrivacyServerSideFixedClipping)
    assert strategy.inner.accountant is not None  # q = 1: Flower's accounted path, fedtune's accountant
    grid = flower_fakes.FakeGrid([1, 2, 3, 4], big_update, examples={1: 5, 2: 50, 3: 500, 4: 5000})
    nodes, released = play(strategy, grid, 1)
    assert nodes == [1, 2, 3, 4]
    total = clipped_sum(1, nodes, 0.5)
    mean = {k: START[k] + total[k] / 4 for k in START}  # equal weights, whatever the example counts
    noise = noise_of(released, mean)
    want = 2.0 * 0.5 / 4
    assert noise.std() == pytest.approx(want, rel=0.02)
    assert abs(noise.mean()) < 4 * want / math.sqrt(noise.size)
    assert stats.normaltest(noise).pvalue > 1e-3
    # every update was clipped (norms 2, 4, 6, 8 > C = 0.5)
    assert strategy.inner.last_round["clipped_fraction"] == 1.0
    assert strategy.inner.last_round["update_norm_median"] == pytest.approx(5.0, rel=1e-3)
    assert strategy.ledger.server_events() == {1: p.event}


def test_without_noise_the_release_is_exactly_the_mean_of_the_clipped_updates(monkeypatch: pytest.MonkeyPatch) -> None:
    """Noise multiplier tiny: what is left is the clipping and the equal-weight mean, checked to float precision."""
    p = plan(clients=3, sigma=1e-9, clip=3.0)  # norms 2 (kept), 4 and 6 (clipped to 3)
    strategy = strategy_for(p)
    # no budget check: an epsilon for sigma = 1e-9 is not what this test is about
    monkeypatch.setattr(strategy.inner, "budget_left", lambda: True)
    monkeypatch.setattr(strategy.inner, "accountant", None)
    grid = flower_fakes.FakeGrid([1, 2, 3], big_update, examples={1: 1, 2: 10, 3: 100})
    _, released = play(strategy, grid, 1)
    total = clipped_sum(1, [1, 2, 3], 3.0)
    for k in START:
        np.testing.assert_allclose(released[k], START[k] + total[k] / 3, rtol=0, atol=2e-6)
    assert strategy.inner.last_round["clipped_fraction"] == pytest.approx(2 / 3)


def test_poisson_sampling_uses_a_fixed_denominator_and_the_stated_noise() -> None:
    p = plan(clients=8, per_round=2, sigma=1.0, clip=0.5)
    strategy = strategy_for(p, seed=3)
    assert strategy.inner.accountant is None  # Flower accounts only q = 1; the ledger does the rest
    grid = flower_fakes.FakeGrid(range(1, 9), big_update)
    nodes, released = play(strategy, grid, 1)
    assert nodes  # seed 3 samples someone in round 1
    total = clipped_sum(1, nodes, 0.5)
    mean = {k: START[k] + total[k] / 2 for k in START}  # divided by M = 2, not by len(nodes)
    noise = noise_of(released, mean)
    assert noise.std() == pytest.approx(1.0 * 0.5 / 2, rel=0.02)
    assert abs(noise.mean()) < 4 * 0.25 / math.sqrt(noise.size)


def test_poisson_sampling_includes_each_client_with_probability_M_over_K() -> None:
    small = {k: v[:8] for k, v in START.items()}

    def answer(rnd: int, node: int) -> dict[str, np.ndarray]:
        return {k: v + 0.01 * node for k, v in small.items()}

    p = plan(clients=8, per_round=2)
    strategy = strategy_for(p, seed=11)
    grid = flower_fakes.FakeGrid(range(1, 9), answer)
    counts = np.zeros(8)
    rounds = 300
    for rnd in range(1, rounds + 1):
        messages = list(strategy.configure_train(rnd, to_record(small), ConfigRecord({}), grid))  # type: ignore[arg-type]
        for m in messages:
            counts[m.metadata.dst_node_id - 1] += 1
        strategy.aggregate_train(rnd, grid.answer(messages))
    # each node: Binomial(300, 0.25); all 8 within 4 standard deviations, and the total within 4 too
    sd = math.sqrt(rounds * 0.25 * 0.75)
    assert np.all(np.abs(counts - rounds * 0.25) < 4 * sd), counts
    assert abs(counts.sum() - 8 * rounds * 0.25) < 4 * math.sqrt(8) * sd
    assert len(strategy.ledger.server_events()) == rounds  # one release per round, empty samples included


def test_an_empty_poisson_sample_still_releases_the_noised_model() -> None:
    p = plan(clients=2, per_round=1, sigma=1.0, clip=0.5)

    class Never(random.Random):
        def random(self) -> float:
            return 0.999  # >= q = 0.5: nobody is sampled

    ledger = PrivacyLedger(None, 1e-5)
    fedavg = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=1, min_available_nodes=1)
    strategy = LedgerStrategy(ClientLevelDP(fedavg, p, ledger, rng=Never()), ledger)
    grid = flower_fakes.FakeGrid([1, 2], big_update)
    messages = list(strategy.configure_train(1, to_record(START), ConfigRecord({}), grid))  # type: ignore[arg-type]
    assert messages == [] and not strategy.exhausted  # an empty sample is not the end of the run
    arrays, _ = strategy.aggregate_train(1, [])
    assert arrays is not None
    noise = noise_of({k: arrays[k].numpy() for k in arrays.keys()}, {k: v.astype(np.float64) for k, v in START.items()})
    assert noise.std() == pytest.approx(1.0 * 0.5 / 1, rel=0.02)  # releasing x unchanged would reveal the empty sample
    assert ledger.server_events() == {1: p.event}


def test_a_client_that_sends_the_model_back_unchanged_gets_no_release() -> None:
    strategy = strategy_for(plan(clients=2))
    grid = flower_fakes.FakeGrid([1, 2], lambda rnd, node: big_update(rnd, node) if node == 1 else dict(START))
    messages = list(strategy.configure_train(1, to_record(START), ConfigRecord({}), grid))  # type: ignore[arg-type]
    arrays, _ = strategy.aggregate_train(1, grid.answer(messages))
    assert arrays is None and strategy.ledger.server_events() == {}


def test_a_missing_client_with_every_client_per_round_releases_nothing() -> None:
    """q = 1 is Flower's strict path: a reply count other than K is not DP-FedAvg's mechanism."""
    strategy = strategy_for(plan(clients=3))
    grid = flower_fakes.FakeGrid([1, 2, 3], big_update)
    messages = list(strategy.configure_train(1, to_record(START), ConfigRecord({}), grid))  # type: ignore[arg-type]
    arrays, _ = strategy.aggregate_train(1, grid.answer(messages)[:2])
    assert arrays is None and strategy.ledger.server_events() == {}


# -- the accounting --------------------------------------------------------------------------------


@pytest.mark.parametrize("per_round", [None, 3])
def test_the_ledger_composes_the_server_events_as_the_certified_accountant(per_round: int | None) -> None:
    config = RunConfig(clients=6, rounds=5, client_level_epsilon=4.0, clients_per_round=per_round)
    p = plan_client_level(config)
    assert p is not None and p.sampling_rate == pytest.approx((per_round or 6) / 6)
    assert p.certified_epsilon <= 4.0
    ledger = PrivacyLedger(None, config.delta)
    strategy = LedgerStrategy(wrap_client_level(config, ledger, 1, rng=random.Random(5)), ledger)
    grid = flower_fakes.FakeGrid(range(1, 7), big_update)
    for rnd in range(1, 6):
        play(strategy, grid, rnd)
        composed = Composition((p.event,) * rnd)
        assert ledger.client_level_epsilon() == pytest.approx(certifier().get_epsilon(composed, config.delta), rel=1e-9)
        if per_round is None:  # Flower's accountant saw the same releases
            spent = strategy.inner.privacy_spent()  # type: ignore[attr-defined]
            assert spent.num_releases == rnd
    final = ledger.client_level_epsilon()
    assert final == pytest.approx(p.certified_epsilon, rel=1e-9) and final <= 4.0
    # a 6th round would exceed the budget the noise was calibrated for: refused, with the reason
    messages = list(strategy.configure_train(6, to_record(START), ConfigRecord({}), grid))  # type: ignore[arg-type]
    assert messages == [] and strategy.exhausted
    assert "client-level epsilon" in (strategy.exhausted_reason or "") and "budget 4" in strategy.exhausted_reason


def test_a_resumed_run_counts_nothing_twice(tmp_path: Any) -> None:
    config = RunConfig(clients=3, rounds=4, client_level_epsilon=6.0, epsilon=math.inf)
    path = tmp_path / "ledger.json"
    ledger = PrivacyLedger.open(path, config.delta, config.epsilon)
    strategy = LedgerStrategy(wrap_client_level(config, ledger, 1), ledger)
    grid = flower_fakes.FakeGrid([1, 2, 3], big_update)
    for rnd in (1, 2):
        play(strategy, grid, rnd)
    before = ledger.client_level_epsilon()
    # the process dies after round 2 was recorded but before its checkpoint: round 2 is played again
    reopened = PrivacyLedger.open(path, config.delta, config.epsilon)
    assert reopened.client_level_epsilon() == pytest.approx(before)
    resumed = LedgerStrategy(wrap_client_level(config, reopened, 1), reopened)
    assert resumed.inner.privacy_spent().num_releases == 2  # type: ignore[attr-defined]  # Flower's view restored
    play(resumed, grid, 2)
    assert reopened.client_level_epsilon() == pytest.approx(before)
    assert sorted(reopened.server_events()) == [1, 2]
    play(resumed, grid, 3)
    assert sorted(reopened.server_events()) == [1, 2, 3]
    acc = flower_accountant(plan_client_level(config), reopened)  # type: ignore[arg-type]
    assert acc.num_releases == 3


# -- refusals --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"client_level_epsilon": 0.0}, "client_level_epsilon must be in (0, inf]"),
        ({"client_level_epsilon": -1.0}, "client_level_epsilon must be in (0, inf]"),
        ({"update_clipping_norm": 0.0}, "update_clipping_norm must be in (0, inf)"),
        ({"clients_per_round": 9}, "clients_per_round must be in [1, clients = 8], got 9"),
        ({"clients_per_round": 0}, "clients_per_round must be an integer >= 1, got 0"),
        ({"client_level_epsilon": 2.0, "clients": 1}, "needs a federated run with clients >= 2, got clients = 1"),
        (
            {"client_level_epsilon": 2.0, "server_optimizer": "fedadam"},
            "server_optimizer must be fedavg, got 'fedadam'",
        ),
    ],
)
def test_bad_client_level_settings_are_refused_with_the_value_and_the_range(changes: dict, message: str) -> None:
    with pytest.raises(ValueError) as err:
        RunConfig(**changes)
    assert message in str(err.value)


def test_client_level_dp_wraps_only_fedavg() -> None:
    with pytest.raises(ValueError, match="wraps Flower's FedAvg, got FedAvgM"):
        ClientLevelDP(FedAvgM(), plan(), PrivacyLedger(None, 1e-5))  # type: ignore[arg-type]


def test_settings_round_trip_through_json_and_flower() -> None:
    config = RunConfig(client_level_epsilon=3.0, update_clipping_norm=0.25, clients_per_round=5)
    assert RunConfig.from_dict(config.to_dict()) == config
    assert RunConfig.from_flower(config.to_flower()) == config
    off = RunConfig()
    assert not off.client_level and off.to_dict()["client_level_epsilon"] == "inf"
    assert RunConfig.from_flower(off.to_flower()) == off and plan_client_level(off) is None
