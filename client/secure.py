"""The client's side of secure aggregation: fedtune's round behind Flower's ``secaggplus_mod``.

A SecAgg+ round (Bell et al., CCS 2020; Bonawitz et al., CCS 2017) reaches the client as four
``train`` messages carrying Flower's ``secaggplus_configs`` record. :func:`secure_train` hands each
to Flower's ``secaggplus_mod`` unchanged; only at the stage that collects the masked vectors does the
mod call the layers below, in this order (as in Flower's ``fl-dp-sa`` example)::

    secaggplus_mod            quantize (clip each coordinate to [-R, R]), mask, send   (Flower)
      _as_update              the update = new weights - global weights                (fedtune)
        fixedclipping_mod     L2-clip the update to C, only under client-level DP      (Flower)
          _fedtune_round      the legacy FitIns -> fedtune's train message -> run_job -> FitRes

So the client trains exactly as in a plain round (:func:`fedtune.client.job.run_job`: privacy plan,
refusal, DP-SGD, its own ledger before replying), and its :class:`~fedtune.protocol.ClientReply`
travels in the clear in the ``FitRes`` metrics while the update is masked. A client that refuses the
round (out of budget, a request it will not honour) raises, which SecAgg+ treats as a dropout.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from typing import cast

import numpy as np
from flwr.app import Context, Message
from flwr.app.message_type import MessageType
from flwr.client.mod import fixedclipping_mod, secaggplus_mod
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE
from flwr.compat.common import recorddict_compat as compat
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from fedtune.protocol import (
    ARRAYS_KEY,
    METRICS_KEY,
    PRIVACY_KEY,
    SECURE_KEYS_KEY,
    SECURE_WEIGHT_KEY,
    SERVER_ROUND_KEY,
    WEIGHT_EXAMPLES,
    WEIGHT_UNIFORM,
    ClientReply,
    secure_metrics,
    to_record,
    train_content,
)

__all__ = ["SecureRoundRefused", "is_secure_message", "secure_train"]

log = logging.getLogger(__name__)

#: The fedtune train handler behind the mods: a fedtune ``train`` message in, a fedtune reply out.
Handler = Callable[[Message, Context], Message]


class SecureRoundRefused(RuntimeError):
    """The client does not take part in this secure round (SecAgg+ sees a dropout); the message says why."""


def is_secure_message(message: Message) -> bool:
    """Whether ``message`` is a stage of Flower's SecAgg+ protocol."""
    return message.metadata.message_type == MessageType.TRAIN and RECORD_KEY_CONFIGS in message.content.config_records


def secure_train(message: Message, context: Context, handler: Handler) -> Message:
    """Answer one SecAgg+ stage; at the masked-vector stage, train with ``handler`` (see the module docstring)."""
    return secaggplus_mod(message, context, partial(_as_update, handler=handler))


def _as_update(message: Message, context: Context, handler: Handler) -> Message:
    """Send ``new - global`` (SecAgg+ then quantizes a bounded update, not the weights), after the
    client-level clipping when the server asks for it."""
    fitins = compat.recorddict_to_fitins(message.content, keep_input=True)
    global_arrays = parameters_to_ndarrays(fitins.parameters)
    inner = partial(_fedtune_round, handler=handler)
    clip = KEY_CLIPPING_NORM in fitins.config  # client-level DP: Flower's DifferentialPrivacyClientSideFixedClipping
    reply = fixedclipping_mod(message, context, inner) if clip else inner(message, context)
    if reply.has_error():
        return reply
    fitres = compat.recorddict_to_fitres(reply.content, keep_input=True)
    new = parameters_to_ndarrays(fitres.parameters)
    update = [np.asarray(n, dtype=np.float64) - np.asarray(g, dtype=np.float64) for n, g in zip(new, global_arrays)]
    _check_range(context, update, fitres.num_examples)
    fitres.parameters = ndarrays_to_parameters(update)
    reply.content = compat.fitres_to_recorddict(fitres, keep_input=True)
    return reply


def _check_range(context: Context, update: list[np.ndarray], weight: int) -> None:
    """Refuse a weight SecAgg+ cannot carry; log the coordinates its clipping range will clip."""
    state = context.state.config_records.get(RECORD_KEY_STATE)
    if state is None:  # pragma: no cover - secaggplus_mod stores its state at the setup stage
        return
    max_weight = float(cast(float, state.get("max_weight", 0.0)))
    clipping_range = float(cast(float, state.get("clipping_range", 0.0)))
    if max_weight > 0 and weight > max_weight:
        raise SecureRoundRefused(
            f"this client's weight {weight} exceeds the SecAgg+ max_weight {max_weight:g}: its masked update would "
            "overflow; the server must raise --secagg-max-weight"
        )
    if max_weight > 0 and clipping_range > 0:
        scaled = np.concatenate([np.abs(u).ravel() for u in update]) * (weight / max_weight)
        clipped = int(np.count_nonzero(scaled > clipping_range))
        if clipped:
            log.warning(
                "secure aggregation clips %d of %d update coordinates to [-%g, %g] (--secagg-clipping-range)",
                clipped,
                scaled.size,
                clipping_range,
                clipping_range,
            )


def _fedtune_round(message: Message, context: Context, handler: Handler) -> Message:
    """The legacy FitIns as a fedtune train message, ``handler``'s reply as a legacy FitRes."""
    fitins = compat.recorddict_to_fitins(message.content, keep_input=True)
    config = fitins.config
    keys = str(config.get(SECURE_KEYS_KEY, "")).split("\n")
    arrays = parameters_to_ndarrays(fitins.parameters)
    if len(keys) != len(arrays):
        raise SecureRoundRefused(f"the server sent {len(arrays)} arrays but {len(keys)} array names")
    weighting = config.get(SECURE_WEIGHT_KEY, WEIGHT_EXAMPLES)
    if weighting not in (WEIGHT_EXAMPLES, WEIGHT_UNIFORM):
        allowed = f"{WEIGHT_EXAMPLES} or {WEIGHT_UNIFORM}"
        raise SecureRoundRefused(f"{SECURE_WEIGHT_KEY} must be {allowed}, got {weighting!r}")
    server_round = int(cast(int, config.get(SERVER_ROUND_KEY, 0)))
    original = message.content
    message.content = train_content(to_record(dict(zip(keys, arrays, strict=True))), server_round)
    try:
        reply = handler(message, context)
    finally:
        message.content = original
    if reply.has_error():
        return reply
    record = reply.content.config_records.get(PRIVACY_KEY)
    if record is None:
        raise SecureRoundRefused("the client's reply carries no privacy record")
    sent = ClientReply.from_config_record(record)
    if not sent.ok:
        raise SecureRoundRefused(f"client {sent.client_id} refuses round {server_round}: {sent.reason}")
    update = reply.content.array_records[ARRAYS_KEY]
    metrics = reply.content.metric_records.get(METRICS_KEY)
    fitres = FitRes(
        status=Status(Code.OK, ""),
        parameters=ndarrays_to_parameters([update[k].numpy() for k in keys]),
        num_examples=sent.examples if weighting == WEIGHT_EXAMPLES else 1,
        metrics=dict(secure_metrics(record, dict(metrics) if metrics is not None else {})),
    )
    reply.content = compat.fitres_to_recorddict(fitres, keep_input=True)
    return reply
