"""RunConfig: validation with clear messages, and lossless round trips (JSON and Flower run_config)."""

from __future__ import annotations

import math

import pytest

from fedtune.config import RunConfig


def test_round_trips() -> None:
    config = RunConfig(
        epsilon=math.inf, clients=3, max_train_examples=120, lora_targets="query,value", min_shard_size=16
    )
    assert RunConfig.from_dict(config.to_dict()) == config
    assert RunConfig.from_flower(config.to_flower()) == config
    assert all(v is not None for v in config.to_flower().values())  # Flower run_config has no None


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"task": "imdb"}, "imdb"),
        ({"epsilon": 0.0}, "epsilon"),
        ({"epsilon": -1.0}, "epsilon"),
        ({"delta": 1.0}, "delta"),
        ({"clients": 0}, "clients"),
        ({"partition": "zipf"}, "zipf"),
        ({"batch_size": 0}, "batch_size"),
        ({"lora_dropout": 1.0}, "lora_dropout"),
        ({"accountant": "magic"}, "magic"),
        ({"max_train_examples": 0}, "max_train_examples"),
        ({"min_shard_size": 0}, "min_shard_size"),
    ],
)
def test_bad_settings_name_the_value(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RunConfig(**changes)


def test_unknown_keys_are_refused() -> None:
    with pytest.raises(ValueError, match="bogus"):
        RunConfig.from_dict({"bogus": 1})


def test_centralized_and_private_flags() -> None:
    assert RunConfig(clients=1).centralized and not RunConfig(clients=2).centralized
    assert not RunConfig(epsilon=math.inf).private and RunConfig(epsilon=3.0).private


def test_epochs_spread_over_the_rounds_decide_the_steps() -> None:
    """``epochs`` fixes the work of the whole run; ``rounds`` only how often it is averaged."""
    from fedtune.workload import local_plan

    config = RunConfig(rounds=11, batch_size=256)
    assert local_plan(config, 8_418) == pytest.approx((256 / 8_418, 3))  # ceil(8418 / (256 * 11))
    assert local_plan(config.replace(clients=1), 67_349)[1] == 24  # the pooled data: ceil(67349 / 2816)
    assert local_plan(config.replace(epochs=2.0), 8_418)[1] == 6
    assert local_plan(config.replace(rounds=1), 8_418)[1] == 33  # one round: the whole epoch
    assert local_plan(config.replace(local_epochs=1.0), 8_418)[1] == 33  # per round, overrides epochs
    assert local_plan(config.replace(local_epochs=1.0, local_steps=5), 8_418)[1] == 5
    assert local_plan(config.replace(batch_size=10_000), 8_418) == (1.0, 1)  # a shard smaller than B: q = 1


@pytest.mark.parametrize("value", [0, -1.0, float("inf"), float("nan")])
def test_bad_epochs_are_refused(value: float) -> None:
    with pytest.raises(ValueError, match=r"epochs must be in \(0, inf\), got"):
        RunConfig(epochs=value)


def test_the_default_recipe() -> None:
    """The defaults are the measured recipe (docs/benchmarks.md, issue 11)."""
    config = RunConfig()
    assert (config.optimizer, config.stateful_clients, config.lr_schedule, config.warmup_fraction) == (
        "adamw",
        True,
        "cosine",
        0.1,
    )
    assert (config.batch_size, config.epochs, config.server_optimizer, config.ffa_lora) == (256, 1.0, "fedavg", False)
    assert config.learning_rate is None and config.client_learning_rate == pytest.approx(0.04)


@pytest.mark.parametrize(
    ("changes", "lr"),
    [
        ({"batch_size": 1024}, 0.01),  # Adam under DP: lr * B fixed ...
        ({"batch_size": 512}, 0.02),
        ({"batch_size": 32}, 0.04),  # ... capped at the largest rate measured
        ({"epsilon": math.inf}, 5e-3),  # without DP
        ({"optimizer": "adambc", "batch_size": 2048}, 0.005),
        ({"optimizer": "sgd"}, 0.5),
        ({"learning_rate": 0.123}, 0.123),  # an explicit rate always wins
    ],
)
def test_the_default_learning_rate_follows_the_batch_and_the_privacy(changes: dict, lr: float) -> None:
    assert RunConfig(**changes).client_learning_rate == pytest.approx(lr)


def test_a_shared_sampling_rate_gives_each_client_its_batch_and_equal_steps() -> None:
    from client.job import optimizer_settings
    from fedtune.workload import local_plan

    # seed 1's Dirichlet(0.5) split of SST-2 (docs/results.md): one client holds 49% of the data
    shards = [4_460, 32_951, 6_759, 525, 4_456, 12_898, 4_300, 1_000]
    config = RunConfig(clients=8, rounds=11, epsilon=8.0, sampling_rate=0.0304)
    batches = [config.client_batch_size(n) for n in shards]
    assert batches == [round(0.0304 * n) for n in shards]  # B_k = q N_k: 1,002 for the largest, 16 for the smallest
    plans = [local_plan(config, n) for n in shards]
    for (q, _), n, b in zip(plans, shards, batches, strict=True):
        assert q == pytest.approx(b / n) and q == pytest.approx(0.0304, rel=0.04)  # rounding of B_k only
    assert {steps for _, steps in plans} == {3}  # ceil(1 / (q * 11)): the same local work everywhere
    # the learning-rate rule follows each client's batch (Adam: lr * B fixed, capped at 0.04)
    rates = [optimizer_settings(config, 3, 1, b)["learning_rate"] for b in batches]
    assert rates[1] == pytest.approx(10.24 / 1_002) and rates[3] == pytest.approx(0.04)
    assert optimizer_settings(config.replace(learning_rate=0.01), 3, 1, 16)["learning_rate"] == 0.01
    # the weighted mean of the clients' noise is that of one batch of q N, whatever the split
    weights = [n / sum(shards) for n in shards]
    noise_std = math.sqrt(sum((w / b) ** 2 for w, b in zip(weights, batches, strict=True)))
    assert noise_std == pytest.approx(math.sqrt(8) / (0.0304 * sum(shards)), rel=0.05)
    shared = math.sqrt(sum((w / min(256, n)) ** 2 for w, n in zip(weights, shards, strict=True)))
    assert shared == pytest.approx(1.54 * noise_std, rel=0.02)  # one shared B = 256: the large client's noise dominates


def test_without_a_sampling_rate_the_shared_batch_is_unchanged() -> None:
    config = RunConfig(clients=8, rounds=11)
    assert config.sampling_rate is None
    assert [config.client_batch_size(n) for n in (100, 256, 8_418)] == [100, 256, 256]
    assert config.replace(sampling_rate=1.0).client_batch_size(8_418) == 8_418  # q = 1: the whole shard
    assert config.replace(sampling_rate=1e-6).client_batch_size(8_418) == 1  # at least one expected example
    with pytest.raises(ValueError, match="at least 1 training example, got 0"):
        config.client_batch_size(0)


@pytest.mark.parametrize("rate", [0.0, -0.1, 1.5, math.inf, math.nan, True, "0.1"])
def test_bad_sampling_rates_are_refused(rate: object) -> None:
    with pytest.raises(ValueError, match=r"sampling_rate must be a number in \(0, 1\]"):
        RunConfig(sampling_rate=rate)  # type: ignore[arg-type]


def test_the_sampling_rate_round_trips() -> None:
    config = RunConfig(clients=4, sampling_rate=0.03)
    assert RunConfig.from_dict(config.to_dict()) == config
    assert RunConfig.from_flower(config.to_flower()) == config
    assert RunConfig.from_flower(RunConfig(clients=4).to_flower()).sampling_rate is None
