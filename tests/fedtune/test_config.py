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
