"""The ClientApp's deployed path: a SuperNode started by ``fedtune client`` on the client's machine.

Differences from a simulated client, everything else is :func:`fedtune.client.app.run_job`:

* the data is the shard at ``data-path`` on this machine (never the task's full training set);
* the budget (``epsilon``, ``delta``) is the client's own setting, not the server's;
* the ledger, calibration and paid-for updates live in ``state-dir``, keyed by the stable
  ``client-id`` (not Flower's node id, which changes when a SuperNode reconnects);
* the server's settings are reviewed first (:func:`fedtune.client.policy.review_request`): a request
  the client will not honour gets a refusal with a reason, never a crash;
* a client started with ``--require-secure-aggregation`` trains only inside Flower's SecAgg+ (the
  ``secaggplus_mod`` masks what it sends) and refuses a plaintext round, whatever the server's
  settings claim;
* one round at a time per state folder (a file lock): a message of a run the server abandoned
  (e.g. before a restart) and the same round of the resumed run can never both train.

Every decision is appended to ``state-dir/events.jsonl``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import time
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

from flwr.app import Context, Message

from fedtune.client.job import ClientJob, run_job
from fedtune.client.node import NodeSettings
from fedtune.client.policy import review_request
from fedtune.client.privacy import ClientPrivacy
from fedtune.config import RunConfig
from fedtune.data.shards import ShardInfo, shard_info
from fedtune.io import atomic_write_json, read_json
from fedtune.logs import configure_logging
from fedtune.protocol import (
    CONFIG_KEY,
    PRIVACY_KEY,
    SERVER_ROUND_KEY,
    STATUS_REFUSED,
    ClientReply,
    reply_message,
    split_run_config,
)
from fedtune.workload import build_template, cache_key, local_plan

__all__ = ["train_deployed", "state_lock", "record_event"]

log = logging.getLogger("fedtune.client")


@contextlib.contextmanager
def state_lock(state_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``state_dir`` (blocking) while a round is handled."""
    state_dir.mkdir(parents=True, exist_ok=True)
    with open(state_dir / ".lock", "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def record_event(state_dir: Path, event: dict[str, Any]) -> None:
    """Append one decision to ``state_dir/events.jsonl``."""
    state_dir.mkdir(parents=True, exist_ok=True)
    with open(state_dir / "events.jsonl", "a", encoding="utf-8") as handle:
        handle.write(json.dumps({"time": time.time(), **event}, default=str) + "\n")


def _refusal(message: Message, settings: NodeSettings, examples: int, reason: str) -> Message:
    reply = ClientReply(
        client_id=settings.client_id,
        examples=examples,
        status=STATUS_REFUSED,
        reason=reason,
        dp=settings.epsilon != float("inf"),
    )
    return reply_message(message, reply, {})


@lru_cache(maxsize=2)
def _local_data(data_path: str, config: RunConfig) -> tuple[Any, Any, Any]:
    """Packed shard, training model and collator (built once per ClientApp process; the model is
    trained in place each round after the global weights are loaded into it)."""
    from fedtune.batching import pack_dataset
    from fedtune.data import get_task_spec, make_collator, tokenize_dataset
    from fedtune.data.shards import read_shard

    spec = get_task_spec(config.task)
    template, tokenizer = build_template(config, spec.num_labels)
    shard = tokenize_dataset(read_shard(data_path, spec), tokenizer, spec, config.max_length)
    return pack_dataset(shard, tokenizer), template, make_collator(tokenizer)


def _job(config: RunConfig, settings: NodeSettings, shard: ShardInfo, noise_multiplier: float | None) -> ClientJob:
    tokenized, template, collator = _local_data(str(settings.data_path), cache_key(config, data=False))
    q, steps = local_plan(config, len(tokenized))
    return ClientJob(
        client_id=settings.client_id,
        guard=ClientPrivacy(
            settings.client_id, settings.state_dir, settings.epsilon, settings.delta, settings.accountant
        ),
        shard=tokenized,
        sampling_rate=q,
        steps=steps,
        new_model=lambda: template,
        collator=collator,
        seed_index=shard.index or 0,
        noise_multiplier=noise_multiplier,
    )


def _bind_run(state_dir: Path, run_key: str) -> str | None:
    """Tie ``state_dir`` to the federated run ``run_key`` on first use; the reason to refuse another run."""
    if not run_key:
        return None
    path = state_dir / "run.json"
    if path.exists():
        bound = str(read_json(path).get("run_key", ""))
        if bound != run_key:
            return (
                f"this client's state folder {state_dir} belongs to federated run {bound}, not {run_key}: its ledger "
                "numbers that run's rounds; start the client with a new --state-dir for a new run"
            )
        return None
    atomic_write_json(path, {"run_key": run_key, "bound_at": time.time()})
    return None


def train_deployed(message: Message, context: Context, *, secure: bool = False) -> Message:
    """Handle one ``train`` message on a deployed SuperNode (see the module docstring).

    ``secure`` says that the message reached the client through Flower's ``secaggplus_mod`` (the
    reply will be masked); a client started with ``--require-secure-aggregation`` refuses any other.
    """
    configure_logging()
    settings = NodeSettings.from_node_config(context.node_config)
    reason: str | None  # why this client refuses the round, if it does
    with state_lock(settings.state_dir):
        try:
            shard = shard_info(settings.data_path)
        except (ValueError, OSError) as err:
            reason = f"this client's data is unusable: {err}"
            log.error("client %s refuses: %s", settings.client_id, reason)
            record_event(settings.state_dir, {"decision": "refused", "reason": reason, "run": context.run_id})
            return _refusal(message, settings, 1, reason)
        message_config = message.content.config_records.get(CONFIG_KEY)
        server_round = message_config.get(SERVER_ROUND_KEY) if message_config is not None else None
        try:
            config, options = split_run_config(context.run_config)
        except (ValueError, TypeError) as err:
            reason = f"the server's run settings are invalid: {err}"
        else:
            reason = review_request(config, options, settings, shard, message_config) or _bind_run(
                settings.state_dir, options.run_key
            )
        if reason is None and settings.require_secure_aggregation and not secure:
            reason = (
                "this client requires secure aggregation (--require-secure-aggregation) and the server sent a "
                "plaintext round; start the server with --secure-aggregation"
            )
        if reason is not None:
            log.warning("client %s refuses round %s: %s", settings.client_id, server_round, reason)
            record_event(
                settings.state_dir,
                {"round": server_round, "decision": "refused", "reason": reason, "run": context.run_id},
            )
            return _refusal(message, settings, shard.examples, reason)
        job = _job(config, settings, shard, options.noise_multiplier or None)
        reply = run_job(message, config, job)
        sent = ClientReply.from_config_record(reply.content.config_records[PRIVACY_KEY])
        decision = "resent" if sent.resent else ("trained" if sent.ok else "refused")
        record_event(
            settings.state_dir,
            {
                "round": server_round,
                "decision": decision,
                "reason": sent.reason,
                "run": context.run_id,
                "epsilon_certified": sent.epsilon_certified,
            },
        )
        log.info("client %s round %s: %s", settings.client_id, server_round, decision)
        return reply
