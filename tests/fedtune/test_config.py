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
