"""The fedtune ClientApp (Flower Message API): local DP-SGD on the client's own shard.

A simulated client (``fedtune simulate``, ``flwr run .``) takes its shard from the shared workload
(:func:`fedtune.client.job.train_round`); a deployed one (a SuperNode started by ``fedtune client``)
takes it from its own machine and checks the server's settings against its own first
(:mod:`fedtune.client.deployed`). Both run :func:`fedtune.client.job.run_job`.
"""

from __future__ import annotations

from functools import partial

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedtune.client.job import train_round
from fedtune.client.node import DATA_PATH_KEY
from fedtune.client.secure import is_secure_message, secure_train
from fedtune.config import RunConfig

__all__ = ["make_client_app"]


def make_client_app(config: RunConfig | None = None) -> ClientApp:
    """A ClientApp for ``config`` (None: read the settings from Flower's run config)."""
    app = ClientApp()

    @app.train()
    def train(message: Message, context: Context) -> Message:
        if is_secure_message(message):  # a stage of Flower's SecAgg+ (secure_aggregation): client/secure.py
            return secure_train(message, context, partial(round_, secure=True))
        return round_(message, context, secure=False)

    def round_(message: Message, context: Context, *, secure: bool) -> Message:
        if config is None and DATA_PATH_KEY in context.node_config:  # a SuperNode started by `fedtune client`
            from fedtune.client.deployed import train_deployed

            return train_deployed(message, context, secure=secure)
        run = RunConfig.from_flower(dict(context.run_config)) if config is None else config
        partition_id = int(context.node_config.get("partition-id", 0))
        return train_round(message, run, partition_id)

    return app


#: Entry point for ``flwr run .`` (``[tool.flwr.app.components] clientapp``).
app = make_client_app()
