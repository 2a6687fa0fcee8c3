"""The fedtune ClientApp (Flower Message API): local DP-SGD on the client's own shard.

For each ``train`` message the client

1. reads the global adapter and the round number;
2. plans its privacy (certified noise for its budget over all planned rounds, computed once) and
   refuses, with a reason, if this round would exceed its budget (its own ledger, not the server's);
3. trains a fresh copy of the model with Opacus DP-SGD (Poisson rate q = B/N, clipping C, noise sigma);
4. records the spend and the update in its own state folder *before* replying;
5. replies with the new adapter and head weights, its example count and loss, and the round's
   privacy event. A round it has already paid for is answered with the stored update (no new spend).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedtune.client.privacy import ClientPrivacy, Plan
from fedtune.config import RunConfig
from fedtune.privacy.events import SubsampledGaussianEvent
from fedtune.records import to_record, to_state
from fedtune.server.strategy import PRIVACY_KEY, STATUS_OK, STATUS_REFUSED
from fedtune.workload import get_workload

__all__ = ["make_client_app", "train_round", "client_state_dir"]

log = logging.getLogger(__name__)


def client_state_dir(config: RunConfig, client_id: str) -> Path:
    """Where a simulated client keeps its ledger (``OUT/clients/client-ID``)."""
    return config.out_dir / "clients" / f"client-{client_id}"


def _reply(message: Message, update: dict[str, np.ndarray] | None, privacy: dict[str, Any], metrics: dict[str, float]) -> Message:
    content = RecordDict({PRIVACY_KEY: ConfigRecord(privacy), "metrics": MetricRecord(metrics)})
    if update is not None:
        content["arrays"] = to_record(update)
    return Message(content, reply_to=message)


def train_round(message: Message, config: RunConfig, partition_id: int, state_dir: Path | None = None) -> Message:
    """Handle one ``train`` message for client ``partition_id`` (the body of the ClientApp)."""
    from fedtune.model import pick_device, set_trainable_state
    from fedtune.train import TrainConfig, train_local

    server_round = int(message.content["config"]["server-round"])
    client_id = str(partition_id)
    workload = get_workload(config)
    shard = workload.train_set(partition_id)
    examples = len(shard)
    q, steps = workload.sampling_rate(partition_id), workload.steps_per_round(partition_id)
    guard = ClientPrivacy(client_id, state_dir or client_state_dir(config, client_id), config.epsilon, config.delta, config.accountant)
    base = {"client-id": client_id, "examples": examples, "sampling-rate": q, "steps": steps, "dp": guard.private}
    sigma: float | None = None
    if guard.private:
        sigma = guard.calibrate(Plan(q, steps, config.rounds)).sigma
        event = SubsampledGaussianEvent(q, sigma, steps)
        if guard.paid_for(server_round):
            update = guard.paid_update(server_round)
            if update is not None:
                log.info("client %s: round %d already paid for; re-sending the stored update", client_id, server_round)
                return _reply(message, update, {**base, "status": STATUS_OK, "noise-multiplier": sigma, "resent": True}, {"num-examples": examples})
        verdict = guard.admit(event)
        if not verdict.allowed:
            log.info("client %s refuses round %d: %s", client_id, server_round, verdict.reason)
            return _reply(message, None, {**base, "status": STATUS_REFUSED, "reason": verdict.reason, "noise-multiplier": sigma}, {"num-examples": examples})
    model = workload.new_model()
    set_trainable_state(model, to_state(message.content["arrays"]))
    train_config = TrainConfig(
        batch_size=config.batch_size, steps=steps, learning_rate=config.learning_rate,
        max_grad_norm=config.max_grad_norm, noise_multiplier=sigma, seed=config.seed * 100_003 + server_round * 1009 + partition_id,
    )
    result = train_local(model, shard, workload.collator, train_config, pick_device())
    update = {k: v.detach().cpu().numpy() for k, v in result.state.items()}
    privacy = {**base, "status": STATUS_OK, "noise-multiplier": sigma if sigma is not None else 0.0}
    if guard.private:
        event = SubsampledGaussianEvent(result.sampling_rate, sigma, result.steps)
        guard.record(server_round, event, examples, update)
        privacy.update({"sampling-rate": event.sampling_rate, "steps": event.steps,
                        "epsilon": guard.ledger.epsilon(client_id), "epsilon-certified": guard.ledger.certified_epsilon(client_id)})
    metrics = {"num-examples": examples, "train-loss": float(result.mean_loss), "seconds": float(result.seconds)}
    if not math.isfinite(metrics["train-loss"]):
        metrics["train-loss"] = -1.0
    return _reply(message, update, privacy, metrics)


def make_client_app(config: RunConfig | None = None) -> ClientApp:
    """A ClientApp for ``config`` (None: read the settings from Flower's run config)."""
    app = ClientApp()

    @app.train()
    def train(message: Message, context: Context) -> Message:
        run = RunConfig.from_flower(dict(context.run_config)) if config is None else config
        partition_id = int(context.node_config.get("partition-id", 0))
        return train_round(message, run, partition_id)

    return app


#: Entry point for ``flwr run .`` (``[tool.flwr.app.components] clientapp``).
app = make_client_app()
