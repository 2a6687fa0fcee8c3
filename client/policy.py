"""A deployed client's review of what the server asks, before it touches its data.

The server chooses the run settings (task, rounds, batch size, steps, clipping norm, ...) and may
ask for a noise multiplier; the client holds the data and its own budget. It refuses, with a
reason the server logs, any request it cannot honour within that budget or that makes no sense
for its data. It never crashes on a bad request: a crash would tell the server less and could
leave its state half-written.
"""

from __future__ import annotations

import math
from typing import Any

from fedtune.client.node import NodeSettings
from fedtune.config import RunConfig
from fedtune.data.shards import ShardInfo
from fedtune.protocol import SERVER_ROUND_KEY, DeployOptions

__all__ = ["review_request"]


def _server_round(message_config: Any, rounds: int) -> tuple[int | None, str | None]:
    try:
        value = message_config[SERVER_ROUND_KEY]
    except (KeyError, TypeError):
        return None, "the train message carries no server-round"
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= rounds:
        return None, f"server-round {value!r} is not an integer in [1, {rounds}] (the run has {rounds} rounds)"
    return value, None


def review_request(
    config: RunConfig, options: DeployOptions, settings: NodeSettings, shard: ShardInfo, message_config: Any
) -> str | None:
    """The reason to refuse this training request, or None to accept it.

    Parameters
    ----------
    config, options : the server's run settings (already parsed and range-checked).
    settings : this client's own settings (budget, data, state folder).
    shard : this client's data.
    message_config : the ``config`` ConfigRecord of the train message.
    """
    _, problem = _server_round(message_config, config.rounds)
    if problem:
        return problem
    if shard.task is not None and shard.task != config.task:
        return f"the server asks for task {config.task!r}, but this client's data is task {shard.task!r}"
    client_private = not math.isinf(settings.epsilon)
    if config.private and not client_private:
        return (
            f"the server runs with DP (epsilon {config.epsilon:g}) but this client was started without a budget "
            "(--epsilon inf); restart it with a finite --epsilon"
        )
    if client_private and not config.private:
        return (
            "the server asks to train without DP (epsilon inf); "
            f"this client only trains with DP within its budget epsilon {settings.epsilon:g}"
        )
    if client_private and settings.delta >= 1.0 / shard.examples:
        return f"this client's delta {settings.delta:g} is not below 1 / {shard.examples} examples"
    if options.noise_multiplier and not client_private:
        return "the server asks for a noise multiplier but this client trains without DP"
    return None
