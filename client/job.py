"""One client's round, wherever its data comes from: privacy plan, DP-SGD, record, reply.

For each ``train`` message the client

1. reads the global adapter and the round number;
2. plans its privacy (certified noise for its budget over all planned rounds, computed once) and
   refuses, with a reason, if this round would exceed its budget (its own ledger, not the server's);
3. trains its model with Opacus DP-SGD (Poisson rate q = B/N, clipping C, noise sigma);
4. records the spend and the update in its own state folder *before* replying;
5. replies (:class:`fedtune.protocol.ClientReply`) with the new adapter and head weights, its
   example count and loss, and the round's privacy event. A round it has already paid for is
   answered with the stored update (no new spend).

A simulated client takes its shard from the shared workload (:func:`train_round`); a deployed one
from its own machine (:mod:`fedtune.client.deployed`). Both run :func:`run_job`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, cast

from flwr.app import ArrayRecord, Message

from fedtune.client.optimizer_state import ControlVariateStore, OptimizerStateStore
from fedtune.client.privacy import ClientPrivacy, Plan
from fedtune.config import RunConfig
from fedtune.privacy.events import SubsampledGaussianEvent
from fedtune.protocol import (
    ARRAYS_KEY,
    CONFIG_KEY,
    CONTROL_KEY,
    SERVER_ROUND_KEY,
    STATUS_REFUSED,
    ClientReply,
    reply_message,
    to_state,
)
from fedtune.workload import get_workload

__all__ = ["ClientJob", "client_state_dir", "label_offset", "optimizer_settings", "run_job", "train_round"]

log = logging.getLogger(__name__)


def client_state_dir(config: RunConfig, client_id: str) -> Path:
    """Where a simulated client keeps its ledger (``OUT/clients/client-ID``)."""
    return config.out_dir / "clients" / f"client-{client_id}"


@dataclass
class ClientJob:
    """Everything one client needs for a round, wherever its data comes from.

    A simulated client gets it from the shared :class:`~fedtune.workload.Workload` (its partition of
    the task); a deployed client from its own shard on its own machine
    (:mod:`fedtune.client.deployed`). Both then run the same :func:`run_job`.
    """

    client_id: str
    guard: ClientPrivacy
    shard: Any  # a PackedDataset (fedtune.batching), built once per process
    sampling_rate: float
    steps: int
    new_model: Callable[[], Any]  # the model to train in place (the global weights are loaded into it first)
    collator: Any
    seed_index: int
    noise_multiplier: float | None = None


def _use_threads(cpus: float) -> None:
    """Give torch as many threads as Ray gave this client CPUs (Ray sets OMP_NUM_THREADS for its
    actors, but a torch already initialised in the process keeps its own count)."""
    import torch

    try:
        import ray

        if not (ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None):
            return  # not a Ray actor: leave the host process's setting alone
    except (ImportError, RuntimeError, AttributeError):  # pragma: no cover
        return
    threads = max(1, int(cpus))
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def train_round(message: Message, config: RunConfig, partition_id: int, state_dir: Path | None = None) -> Message:
    """Handle one ``train`` message for simulated client ``partition_id`` (the body of the ClientApp)."""
    client_id = str(partition_id)
    _use_threads(config.cpus_per_client)
    workload = get_workload(config)
    job = ClientJob(
        client_id=client_id,
        guard=ClientPrivacy(
            client_id, state_dir or client_state_dir(config, client_id), config.epsilon, config.delta, config.accountant
        ),
        shard=workload.packed_train_set(partition_id),
        sampling_rate=workload.sampling_rate(partition_id),
        steps=workload.steps_per_round(partition_id),
        new_model=workload.work_model,
        collator=workload.collator,
        seed_index=partition_id,
    )
    return run_job(message, config, job)


def optimizer_settings(config: RunConfig, steps: int, server_round: int, batch: int | None = None) -> dict[str, Any]:
    """TrainConfig's optimizer, schedule and engine settings for round ``server_round`` of ``config``.

    ``batch``: the client's expected batch, for the learning-rate rule (default ``config.batch_size``).

    The schedule spans the client's whole plan, ``rounds * steps`` steps; round ``r`` runs plan
    steps ``(r - 1) * steps + 1 .. r * steps``, and the warm-up is ``warmup_fraction`` of the plan.
    """
    plan = config.rounds * steps
    return {
        "learning_rate": config.learning_rate_for(config.batch_size if batch is None else batch),
        "optimizer": config.optimizer,
        "momentum": config.momentum,
        "weight_decay": config.weight_decay,
        "lr_schedule": config.lr_schedule,
        "warmup_steps": int(config.warmup_fraction * plan),
        "plan_steps": plan,
        "plan_offset": (min(server_round, config.rounds) - 1) * steps,
        "max_grad_norm": config.max_grad_norm,
        "physical_batch_size": config.physical_batch_size,
        "precision": config.precision,
        "dp_randomness": config.dp_randomness,
    }


def run_job(message: Message, config: RunConfig, job: ClientJob) -> Message:
    """Train one round for ``job``: privacy plan, refusal or re-send, DP-SGD, record, reply."""
    from fedtune.model import pick_device, set_trainable_state
    from fedtune.progress import TrainingProgress
    from fedtune.train import OptimizerStateError, TrainConfig, train_local

    server_round = int(cast(int, message.content[CONFIG_KEY][SERVER_ROUND_KEY]))
    client_id, guard = job.client_id, job.guard
    examples = len(job.shard)
    q, steps = job.sampling_rate, job.steps
    base = ClientReply(client_id=client_id, examples=examples, dp=guard.private, sampling_rate=q, steps=steps)
    released = guard.released_event() if guard.private else None
    if released is not None:  # every reply carries the one-off release, so the server's ledger has it too
        base = replace(base, release_noise_multiplier=released.noise_multiplier)
    counted = {"num-examples": examples}

    def refuse(reason: str, sigma: float | None) -> Message:
        log.warning("client %s refuses round %d: %s", client_id, server_round, reason)
        return reply_message(
            message, replace(base, status=STATUS_REFUSED, reason=reason, noise_multiplier=sigma or 0.0), counted
        )

    sigma: float | None = None
    offset: Any = None
    epsilon_before: float | None = None
    epsilon_after: float | None = None
    if guard.private:
        paid = guard.paid_event(server_round)
        if paid is not None:
            update = guard.paid_update(server_round)
            if update is None:  # training again would release a second output for a round counted once
                return refuse(
                    f"round {server_round} is already paid for but its stored update is missing from "
                    f"{guard.state_dir}; refusing to train it again",
                    paid.noise_multiplier,
                )
            log.info("client %s: round %d already paid for; re-sending the stored update", client_id, server_round)
            control = None
            if config.scaffold:
                try:
                    control = ControlVariateStore(guard.state_dir).at(server_round)
                except ValueError as err:
                    log.warning(
                        "client %s: the stored control variate is unreadable (%s); re-sending without it",
                        client_id,
                        err,
                    )
            resent = replace(
                base,
                sampling_rate=paid.sampling_rate,
                steps=paid.steps,
                noise_multiplier=paid.noise_multiplier,
                resent=True,
            )
            return reply_message(message, resent, counted, update, control)
        adjusted = label_offset(config, job)
        if isinstance(adjusted, str):
            return refuse(adjusted, None)
        offset, release = adjusted
        if release is not None:
            base = replace(base, release_noise_multiplier=release.noise_multiplier)
        plan = Plan(q, steps, config.rounds, (release,) if release is not None else ())
        if job.noise_multiplier is None:
            sigma = guard.calibrate(plan).sigma
        else:
            verdict = guard.check_noise(plan, job.noise_multiplier)
            if not verdict.allowed:
                return refuse(verdict.reason, job.noise_multiplier)
            sigma = job.noise_multiplier
        verdict = guard.admit(SubsampledGaussianEvent(q, sigma, steps))
        if not verdict.allowed:
            return refuse(verdict.reason, sigma)
        epsilon_before, epsilon_after = guard.ledger.certified_epsilon(client_id), verdict.epsilon_after
    else:
        adjusted = label_offset(config, job)
        if isinstance(adjusted, str):  # pragma: no cover - only a private release can be refused
            return refuse(adjusted, None)
        offset = adjusted[0]
    store = OptimizerStateStore(guard.state_dir) if config.stateful_clients else None
    try:
        previous = store.load(before_round=server_round) if store is not None else None
    except ValueError as err:  # a damaged state file: refuse with the reason rather than crash or drop it silently
        return refuse(f"cannot continue the client's optimizer state: {err}; remove the file to start afresh", sigma)
    if previous is not None:
        log.debug("client %s continues its optimizer state of round %d", client_id, previous[0])
    model = job.new_model()
    global_state = to_state(cast(ArrayRecord, message.content[ARRAYS_KEY]))
    try:
        set_trainable_state(model, global_state)
    except ValueError as err:  # the server's global model itself is malformed: refuse, never crash
        return refuse(f"the global model sent for round {server_round} is unusable: {err}", sigma)
    controls = ControlVariateStore(guard.state_dir) if config.scaffold else None
    correction = None
    if controls is not None:
        try:
            correction = scaffold_correction(message, global_state, controls, server_round)
        except ValueError as err:
            return refuse(str(err), sigma)
    batch = config.client_batch_size(examples)
    train_config = TrainConfig(
        batch_size=batch,
        steps=steps,
        seed=config.seed * 100_003 + server_round * 1009 + job.seed_index,
        log_every=max(1, steps // 100),
        noise_multiplier=sigma,
        **optimizer_settings(config, steps, server_round, batch),
    )
    try:
        with TrainingProgress(
            f"client {client_id} round {server_round}",
            steps,
            epsilon_before=epsilon_before,
            epsilon_after=epsilon_after,
        ) as progress:
            result = train_local(
                model,
                job.shard,
                job.collator,
                train_config,
                pick_device(),
                progress=progress,
                in_place=True,
                optimizer_state=previous[1] if previous is not None else None,
                gradient_correction=correction,
                track_mean_gradient=controls is not None,
                logit_offset=offset,
            )
    except OptimizerStateError as err:  # raised before the first step: nothing trained, nothing spent
        path = guard.state_dir / "optimizer.pt"
        return refuse(f"the optimizer state in {path} does not fit this run: {err}; remove it to start afresh", sigma)
    update = {k: v.detach().cpu().numpy() for k, v in result.state.items()}
    reply = replace(base, noise_multiplier=sigma if sigma is not None else 0.0)
    if guard.private:
        if sigma is None:  # pragma: no cover - calibrated above for every private round
            raise RuntimeError("a private round reached training without a noise multiplier")
        event = SubsampledGaussianEvent(result.sampling_rate, sigma, result.steps)
        guard.record(server_round, event, examples, update)
        reply = replace(
            reply,
            sampling_rate=event.sampling_rate,
            steps=event.steps,
            epsilon=guard.ledger.epsilon(client_id),
            epsilon_certified=guard.ledger.certified_epsilon(client_id),
        )
    else:
        reply = replace(reply, steps=result.steps)
    # Only after the spend is recorded: the state carries this round's privatized gradients into
    # later updates, so it must never outlive a crash that leaves the round unrecorded (and trained again).
    if store is not None and result.optimizer_state is not None:
        store.save(server_round, result.optimizer_state)
    if controls is not None and result.mean_gradient is not None:
        controls.save(server_round, result.mean_gradient)
    metrics = {
        "train-loss": float(result.mean_loss),
        "seconds": float(result.seconds),
        "examples-per-second": float(result.examples_per_second),
        "padding-efficiency": float(result.padding_efficiency),
    }
    for key, value in metrics.items():
        if not math.isfinite(value):
            metrics[key] = -1.0  # every batch was empty: nothing to measure
    return reply_message(message, reply, metrics, update, result.mean_gradient if controls is not None else None)


def label_offset(config: RunConfig, job: ClientJob) -> tuple[Any, Any] | str:
    """The client's logit-adjustment offset (:func:`fedtune.train.logit_adjustment`) and its release event.

    Returns ``(None, None)`` when ``config.logit_adjustment`` is 0. Without DP the offset comes from
    the shard's exact label counts and there is no event; under DP from the counts the client
    released once (:meth:`~fedtune.client.privacy.ClientPrivacy.release_label_counts`), whose event
    joins its plan. A string is the reason to refuse.
    """
    if config.logit_adjustment <= 0:
        return None, None
    import numpy as np

    from fedtune.data.glue import get_task_spec
    from fedtune.train import label_counts, logit_adjustment

    counts = label_counts(job.shard.columns["labels"], get_task_spec(config.task).num_labels).numpy()
    if not job.guard.private:
        return logit_adjustment(counts, config.logit_adjustment), None
    seed = None if config.dp_randomness == "secret" else [config.seed, job.seed_index, 0x1ABE1]
    released = job.guard.release_label_counts(
        counts, config.label_count_noise, len(job.shard), np.random.default_rng(seed)
    )
    if isinstance(released, str):
        return released
    noisy, event = released
    return logit_adjustment(noisy, config.logit_adjustment), event


def scaffold_correction(
    message: Message, global_state: dict[str, Any], controls: ControlVariateStore, server_round: int
) -> dict[str, Any]:
    r"""SCAFFOLD's gradient correction :math:`c - c_k` for this round (Karimireddy et al. 2020, eq. 3).

    :math:`c` is the server's global control variate in ``message``; :math:`c_k` the client's own
    variate of its latest earlier round (zeros before its first). Both are functions of
    privatized gradients only.

    Raises
    ------
    ValueError
        The server sent no variate, or one whose names, shapes or values do not fit the model,
        or the client's stored variate is unreadable or does not fit: the reason to refuse with.
    """
    import torch

    record = message.content.array_records.get(CONTROL_KEY)
    if record is None:
        raise ValueError(
            f"scaffold is on but the server sent no control variate ({CONTROL_KEY!r}) for round {server_round}: "
            "run the server with scaffold too"
        )
    c = to_state(record)
    if set(c) != set(global_state) or any(tuple(c[k].shape) != tuple(global_state[k].shape) for k in c):
        raise ValueError(f"the server's control variate for round {server_round} does not match the model's arrays")
    if not all(bool(torch.isfinite(v).all()) for v in c.values()):
        raise ValueError(f"the server's control variate for round {server_round} holds non-finite values")
    try:
        own = controls.load(before_round=server_round)
    except ValueError as err:
        raise ValueError(
            f"cannot continue the client's control variate: {err}; remove the file to start afresh"
        ) from None
    mine = own[1] if own is not None else {k: torch.zeros_like(v, dtype=torch.float32) for k, v in c.items()}
    if set(mine) != set(c) or any(tuple(mine[k].shape) != tuple(c[k].shape) for k in c):
        raise ValueError(
            f"the control variate in {controls.path} does not fit this run's model; remove it to start afresh"
        )
    return {k: c[k].float() - mine[k].float() for k in c}
