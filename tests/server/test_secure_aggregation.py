"""Secure aggregation (SecAgg+): Flower's real protocol between fedtune's server round and client mods.

No model and no Ray: every node runs :func:`fedtune.client.secure.secure_train` (Flower's
``secaggplus_mod`` and ``fixedclipping_mod`` around fedtune's adapter) in this process over
:class:`inprocess_grid.InProcessGrid`, with a stand-in for the training that returns known updates.
What is checked is what SecAgg+ promises: the server's aggregate is FedAvg of the updates within the
quantization error, what it receives from one client tells nothing about that client's update, a
client that drops out after sharing its keys is removed with its neighbours' shares, and the
privacy events reach the server's ledger although the updates never do.
"""

from __future__ import annotations

import math
from typing import Any

import inprocess_grid
import numpy as np
import pytest
from flwr.app import ArrayRecord, Context, Message
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.serverapp.strategy import FedAvg

from fedtune.client.secure import is_secure_message, secure_train
from fedtune.config import RunConfig
from fedtune.privacy.events import SubsampledGaussianEvent
from fedtune.privacy.ledger import PrivacyLedger
from fedtune.protocol import (
    ARRAYS_KEY,
    CONFIG_KEY,
    SERVER_ROUND_KEY,
    STATUS_REFUSED,
    ClientReply,
    reply_message,
    secure_metrics,
    split_secure_metrics,
    to_record,
)
from fedtune.server.run import ServerRun
from fedtune.server.secure import SecAggSettings, SecureAggregation, SecureRounds
from fedtune.server.strategy import LedgerStrategy

NODES = (11, 12, 13)
EXAMPLES = {11: 120, 12: 60, 13: 90}
SHAPES = {"lora.a": (8, 768), "lora.b": (768, 8), "head.weight": (2, 768), "head.bias": (2,)}


@pytest.fixture(autouse=True)
def _task_identity(flower_task_identity: None) -> None:
    """Messages built here need Flower's task identity (see tests/conftest.py)."""


def _global() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {k: rng.normal(0, 0.05, size=s).astype(np.float32) for k, s in SHAPES.items()}


def _delta(node: int, rnd: int, scale: float = 0.01) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1000 * rnd + node)
    return {k: rng.normal(0, scale, size=s) for k, s in SHAPES.items()}


def _event(node: int) -> SubsampledGaussianEvent:
    return SubsampledGaussianEvent(0.1, 1.0 + node / 100, 4)


class FakeTraining:
    """Stands in for run_job: answers a fedtune train message with ``global + delta(node, round)``."""

    def __init__(self, scale: float = 0.01, refuse: int | None = None) -> None:
        self.scale, self.refuse = scale, refuse
        self.sent: dict[tuple[int, int], dict[str, np.ndarray]] = {}  # (node, round) -> the update sent

    def __call__(self, message: Message, context: Context) -> Message:
        node = context.node_id
        rnd = int(message.content[CONFIG_KEY][SERVER_ROUND_KEY])  # type: ignore[arg-type, index]
        arrays = message.content[ARRAYS_KEY]
        event = _event(node)
        reply = ClientReply(
            f"c{node}",
            EXAMPLES[node],
            sampling_rate=event.sampling_rate,
            noise_multiplier=event.noise_multiplier,
            steps=event.steps,
        )
        if node == self.refuse:
            return reply_message(
                message, ClientReply(f"c{node}", EXAMPLES[node], status=STATUS_REFUSED, reason="budget"), {}
            )
        new = {k: arrays[k].numpy() + d.astype(np.float32) for k, d in _delta(node, rnd, self.scale).items()}  # type: ignore[index, union-attr]
        self.sent[(node, rnd)] = new
        return reply_message(message, reply, {"train-loss": 0.5 + node / 100}, new)


def _federation(
    tmp_path: Any, training: FakeTraining, *, drop: Any = None, **settings: Any
) -> tuple[ServerRun, SecureAggregation, inprocess_grid.InProcessGrid]:
    config = RunConfig(clients=len(NODES), rounds=2, secure_aggregation=True, out=str(tmp_path), **settings)
    ledger = PrivacyLedger.open(tmp_path / "ledger.json", config.delta, config.epsilon)
    grid = inprocess_grid.InProcessGrid(
        {node: (lambda m, c: secure_train(m, c, training)) for node in NODES}, drop=drop
    )
    run = ServerRun(
        config=config,
        strategy=LedgerStrategy(FedAvg(), ledger),
        grid=grid,  # type: ignore[arg-type]
        arrays=to_record(_global()),
        evaluate=lambda arrays: {},
        make_row=lambda run, metrics, result: {},
    )
    secure = SecureAggregation(config, ledger, largest_shard=max(EXAMPLES.values()), timeout=60)
    return run, secure, grid


def _fedavg(updates: dict[int, dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    total = sum(EXAMPLES[n] for n in updates)
    return {k: sum(EXAMPLES[n] * u[k].astype(np.float64) for n, u in updates.items()) / total for k in SHAPES}


def _tolerance(settings: SecAggSettings, nodes: list[int]) -> float:
    """Stochastic rounding moves each client's weighted coordinate by less than one step; the weights are
    quantized too (relative error 2**-22 on a value of order the global weights)."""
    weights = sum(EXAMPLES[n] / settings.max_weight for n in nodes)
    return len(nodes) * settings.step / weights + 1e-6


def _max_error(arrays: ArrayRecord, expected: dict[str, np.ndarray]) -> float:
    return max(float(np.max(np.abs(arrays[k].numpy() - expected[k]))) for k in SHAPES)


def test_the_secure_aggregate_is_fedavg_within_the_quantization_error(tmp_path: Any) -> None:
    training = FakeTraining()
    run, secure, grid = _federation(tmp_path, training)
    result = secure.attempt(run, 1)
    assert result is not None and result.clients_trained == 3 and not result.errors
    expected = _fedavg({n: training.sent[(n, 1)] for n in NODES})
    error = _max_error(result.arrays, expected)
    tolerance = _tolerance(secure.settings, list(NODES))
    assert error < tolerance, (error, tolerance)
    assert tolerance < 1e-4  # far below the updates (std 0.01): the mean really is learned
    # not some client's own update: the nearest is 100x further away than the quantization error
    assert min(_max_error(result.arrays, training.sent[(n, 1)]) for n in NODES) > 100 * tolerance
    # four stages, each client saw each once; the privacy events reached the server's ledger in the clear
    assert sorted(grid.delivered) == sorted((s, n) for s in Stage.all() for n in NODES)
    for node in NODES:
        entry = run.strategy.ledger.composition(f"c{node}")
        assert entry is not None and entry.events == (_event(node),)
        assert run.strategy.ledger.rounds(f"c{node}") == [1]
    assert result.train_metrics["train-loss"] == pytest.approx(
        sum(EXAMPLES[n] * (0.5 + n / 100) for n in NODES) / sum(EXAMPLES.values())
    )
    assert result.arrays["lora.a"].numpy().dtype == np.float32
    assert list(result.arrays.keys()) == list(SHAPES)


def test_what_the_server_receives_from_a_client_is_not_its_update(tmp_path: Any) -> None:
    training = FakeTraining(scale=0.5)  # large updates: a leak would show
    run, secure, _ = _federation(tmp_path, training)
    masked: dict[int, list[np.ndarray]] = {}

    def capture(stage: str, reply: Message) -> None:
        if stage == Stage.COLLECT_MASKED_VECTORS:
            record = reply.content.config_records[RECORD_KEY_CONFIGS]
            masked[reply.metadata.src_node_id] = [bytes_to_ndarray(b) for b in record[Key.MASKED_PARAMETERS]]  # type: ignore[union-attr]
            assert not any(len(r) for r in reply.content.array_records.values())  # no plain array travels

    secure.observers.append(capture)
    assert secure.attempt(run, 1) is not None
    assert sorted(masked) == list(NODES)
    for node in NODES:
        vector = np.concatenate([a.ravel() for a in masked[node][1:]]).astype(np.float64)  # [0]: the masked weight
        update = np.concatenate([_delta(node, 1, 0.5)[k].ravel() for k in SHAPES])
        assert vector.size == update.size
        # uniform on [0, 2**32): mean 2**31, std 2**32 / sqrt(12), uncorrelated with the update (5 sigma bounds)
        n = vector.size
        assert abs(vector.mean() / 2**31 - 1) < 5 * 0.577 / math.sqrt(n)
        assert abs(vector.std() / (2**32 / math.sqrt(12)) - 1) < 5 * 0.447 / math.sqrt(n)
        assert abs(np.corrcoef(vector, update)[0, 1]) < 5 / math.sqrt(n)
        # what the client would have sent without masks: the quantized update (strongly correlated with it)
        settings = secure.settings
        ratio = EXAMPLES[node] / settings.max_weight
        plain = (
            np.clip(update * ratio, -settings.clipping_range, settings.clipping_range) + settings.clipping_range
        ) / settings.step
        assert np.corrcoef(plain, update)[0, 1] > 0.99
        assert np.median(np.abs(vector - plain)) > 2**28


def test_a_client_that_drops_out_after_sharing_keys_is_unmasked_by_its_neighbours(tmp_path: Any) -> None:
    training = FakeTraining()
    dropped = 13
    run, secure, grid = _federation(
        tmp_path, training, drop=lambda stage, node: node == dropped and stage == Stage.COLLECT_MASKED_VECTORS
    )
    result = secure.attempt(run, 1)
    assert result is not None and result.clients_trained == 2 and result.clients_rejected == 1
    assert any("dropped out" in e for e in result.errors)
    # SecAgg+ removed the dropped client's pairwise masks with its neighbours' shares of its key:
    # the aggregate is FedAvg of the two survivors
    survivors = [n for n in NODES if n != dropped]
    expected = _fedavg({n: training.sent[(n, 1)] for n in survivors})
    assert _max_error(result.arrays, expected) < _tolerance(secure.settings, survivors)
    assert (Stage.SHARE_KEYS, dropped) in grid.delivered and (Stage.UNMASK, dropped) not in grid.delivered
    assert run.strategy.ledger.composition(f"c{dropped}") is None  # it never trained: nothing spent
    assert any(r["node"] == dropped for r in run.strategy.rejected)

    # round 2: a client that dies after sending its masked update is still in the sum
    grid.drop = lambda stage, node: node == 11 and stage == Stage.UNMASK
    result = secure.attempt(run, 2)
    assert result is not None and result.clients_trained == 3
    expected = _fedavg({n: training.sent[(n, 2)] for n in NODES})
    assert _max_error(result.arrays, expected) < _tolerance(secure.settings, list(NODES))


def test_too_many_dropouts_halt_the_round_and_stop_a_simulation(tmp_path: Any) -> None:
    training = FakeTraining()
    run, secure, _ = _federation(tmp_path, training, drop=lambda stage, node: node != 11 and stage == Stage.UNMASK)
    reason = SecureRounds(secure).play(run, 1)
    assert isinstance(reason, str) and "secure aggregation failed" in reason and run.failed
    # the clients trained and sent masked updates: their spend is in the server's ledger all the same
    assert sorted(run.strategy.ledger.clients) == [f"c{n}" for n in NODES]


def test_a_refusing_client_is_a_dropout_and_a_rejected_reply_is_withheld(tmp_path: Any) -> None:
    training = FakeTraining(refuse=12)
    run, secure, _ = _federation(tmp_path, training)
    result = secure.attempt(run, 1)
    assert result is not None and result.clients_trained == 2
    assert any("refuses round 1: budget" in e for e in result.errors)
    expected = _fedavg({n: training.sent[(n, 1)] for n in (11, 13)})
    assert _max_error(result.arrays, expected) < _tolerance(secure.settings, [11, 13])

    # a reply the ledger refuses (two nodes claiming one client id with different events) never enters the sum
    run2, secure2, _ = _federation(tmp_path / "b", FakeTraining())
    run2.strategy.ledger.record("c12", 1, SubsampledGaussianEvent(0.5, 0.7, 9), EXAMPLES[12])
    result = secure2.attempt(run2, 1)
    assert result is not None and result.clients_trained == 2
    assert any(r["node"] == 12 for r in run2.strategy.rejected)


def test_client_level_dp_clips_on_the_client_and_noises_the_secure_sum(tmp_path: Any) -> None:
    training = FakeTraining(scale=0.05)  # norms about 0.05 * sqrt(13826) = 6 > C = 1: every update is clipped
    run, secure, _ = _federation(tmp_path, training, client_level_epsilon=50.0, update_clipping_norm=1.0)
    assert secure.client_level is not None and secure.settings.uniform_weights and secure.settings.max_weight == 1
    result = secure.attempt(run, 1)
    assert result is not None and result.clients_trained == 3
    plan = secure.client_level.plan
    assert run.strategy.ledger.server_events() == {1: plan.event}
    base = _global()
    clipped = {}
    for node in NODES:
        delta = {k: training.sent[(node, 1)][k].astype(np.float64) - base[k] for k in SHAPES}
        norm = math.sqrt(sum(float(np.sum(d**2)) for d in delta.values()))
        assert norm > 1.0
        clipped[node] = {k: d / norm for k, d in delta.items()}  # fixedclipping_mod, on the client
    mean = {k: base[k] + sum(clipped[n][k] for n in NODES) / 3 for k in SHAPES}  # equal weights
    residual = np.concatenate([(result.arrays[k].numpy() - mean[k]).ravel() for k in SHAPES])
    assert abs(residual.mean()) < 4 * plan.noise_std / math.sqrt(residual.size)
    assert residual.std() == pytest.approx(plan.noise_std, rel=0.06)  # sigma C / K, Flower's wrapper

    # a dropout: the noise is calibrated for K updates, so the round releases nothing
    run.grid.drop = lambda stage, node: node == 12 and stage == Stage.COLLECT_MASKED_VECTORS  # type: ignore[attr-defined]
    result = secure.attempt(run, 2)
    assert result is not None and result.clients_trained == 0
    assert list(run.strategy.ledger.server_events()) == [1]


def test_client_level_budget_stops_the_secure_rounds(tmp_path: Any) -> None:
    run, secure, _ = _federation(tmp_path, FakeTraining(scale=0.05), client_level_epsilon=50.0)
    plan = secure.client_level.plan  # type: ignore[union-attr]
    for rnd in range(1, plan.rounds + 1):
        run.strategy.ledger.record_server_event(rnd, plan.event)
    reason = SecureRounds(secure).play(run, plan.rounds + 1)
    assert isinstance(reason, str) and "budget" in reason and not run.failed


def test_secagg_settings_defaults() -> None:
    config = RunConfig(clients=4, secure_aggregation=True)
    settings = SecAggSettings.from_config(config, largest_shard=5000)
    assert settings.num_shares == 1.0 and isinstance(settings.num_shares, float)
    assert settings.reconstruction_threshold == pytest.approx(2 / 3)
    assert settings.max_weight == 5000 and not settings.uniform_weights
    assert settings.step == pytest.approx(16 / 2**22)
    assert SecAggSettings.from_config(config, largest_shard=None).max_weight == 100_000
    counted = RunConfig(clients=40, secure_aggregation=True, secagg_num_shares=7, secagg_reconstruction_threshold=4)
    settings = SecAggSettings.from_config(counted, largest_shard=10)
    assert settings.num_shares == 7 and isinstance(settings.num_shares, int) and settings.reconstruction_threshold == 4
    settings.workflow()  # Flower accepts them


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"clients": 1}, "clients must be >= 2"),
        ({"server_optimizer": "fedyogi"}, "server_optimizer must be fedavg"),
        ({"client_level_epsilon": 4.0, "clients_per_round": 2}, "clients_per_round must be None or 4"),
        ({"secagg_num_shares": 2}, r"secagg_num_shares must be a fraction in \(0, 1\] or an integer >= 3, got 2"),
        ({"secagg_num_shares": 0.0}, "secagg_num_shares must be a fraction"),
        ({"secagg_reconstruction_threshold": 1.5}, "integer >= 2, got 1.5"),
        ({"secagg_num_shares": 5, "secagg_reconstruction_threshold": 5}, "must be below secagg_num_shares = 5"),
        ({"secagg_clipping_range": 0.0}, r"secagg_clipping_range must be in \(0, inf\)"),
        ({"secagg_quantization_range": 2**32}, r"integer in \[2, 2\*\*32\)"),
        ({"secagg_quantization_range": 2**31}, r"clients \* secagg_quantization_range must be <= 2\*\*32"),
        ({"secagg_max_weight": -1.0}, "secagg_max_weight must be in"),
    ],
)
def test_config_refuses_what_secure_aggregation_cannot_run(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RunConfig(**{"clients": 4, "secure_aggregation": True, **changes})


def test_secure_settings_round_trip_through_flower_run_config() -> None:
    config = RunConfig(clients=3, secure_aggregation=True, secagg_num_shares=3, secagg_max_weight=500)
    back = RunConfig.from_flower(
        {k: (int(v) if isinstance(v, float) and v.is_integer() and v > 1 else v) for k, v in config.to_flower().items()}
    )
    assert back.secure_aggregation and back.secagg_max_weight == 500.0 and back.secagg_num_shares == 3
    assert RunConfig.from_flower(RunConfig().to_flower()).secagg_max_weight is None


def test_the_client_reply_travels_in_the_fitres_metrics() -> None:
    reply = ClientReply("c1", 40, sampling_rate=0.25, noise_multiplier=1.1, steps=3, epsilon_certified=2.0)
    metrics = secure_metrics(reply.to_config_record(), {"train-loss": 0.4, "num-examples": 40})
    record, rest = split_secure_metrics(metrics)
    assert record is not None and ClientReply.from_config_record(record) == reply
    assert rest == {"train-loss": 0.4, "num-examples": 40}
    assert split_secure_metrics({"train-loss": 1.0})[0] is None


def test_plain_messages_are_not_secure(flower_task_identity: None) -> None:
    from fedtune.protocol import train_content

    message = Message(train_content(to_record(_global()), 1), dst_node_id=1, message_type="train")
    assert not is_secure_message(message)
