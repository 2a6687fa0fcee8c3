"""A ledger-aware strategy: wraps FedAvg (or any Flower strategy) without editing it.

:class:`LedgerStrategy` adds three behaviours around the wrapped strategy's hooks:

* ``configure_train`` leaves out clients whose next round would exceed their budget (certified bound);
* ``aggregate_train`` rejects (and logs) replies that are errors, refusals, or updates with wrong
  keys, shapes or non-finite values, records every accepted client's privacy event in the server's
  ledger, and passes the rest to the wrapped strategy;
* :attr:`LedgerStrategy.exhausted` tells the run loop when no client can train any more.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedtune.privacy.events import SubsampledGaussianEvent
from fedtune.privacy.ledger import RELEASE_ROUND, PrivacyLedger
from fedtune.protocol import METRICS_KEY, PRIVACY_KEY, ClientReply
from fedtune.server.validation import InvalidUpdate, validate_update

__all__ = ["WrappingStrategy", "LedgerStrategy"]

log = logging.getLogger(__name__)


class WrappingStrategy(Strategy):
    """A strategy around another (``inner``) that delegates the hooks it does not change.

    fedtune adds behaviour to Flower's strategies by wrapping them: :class:`LedgerStrategy` and
    :class:`fedtune.server.scaffold.Scaffold` override ``configure_train``/``aggregate_train``
    and leave evaluation and the summary to the wrapped strategy.
    """

    def __init__(self, inner: Strategy) -> None:
        self.inner = inner

    def summary(self) -> None:
        """Delegate."""
        self.inner.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Delegate."""
        return self.inner.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Delegate."""
        return self.inner.aggregate_train(server_round, replies)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Delegate (fedtune evaluates centrally; pass ``fraction_evaluate=0`` to FedAvg to skip this)."""
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Delegate."""
        return self.inner.aggregate_evaluate(server_round, replies)


class LedgerStrategy(WrappingStrategy):
    """Wrap ``inner`` (e.g. ``FedAvg``) with privacy-ledger bookkeeping and update validation.

    Parameters
    ----------
    inner : Strategy
        The aggregation strategy; its ``configure_train``/``aggregate_train`` do the real work.
    ledger : PrivacyLedger
        The server's ledger (clients keep their own as well).
    """

    def __init__(self, inner: Strategy, ledger: PrivacyLedger) -> None:
        super().__init__(inner)
        self.ledger = ledger
        self.node_to_client: dict[int, str] = {}
        self.last_event: dict[str, SubsampledGaussianEvent] = {}
        self.refused: set[str] = set()
        self.rejected: list[dict[str, object]] = []
        self.replies: dict[str, ClientReply] = {}  # each client's latest accepted reply
        self.totals: dict[str, dict[str, int]] = {}  # rounds and steps each client trained in this process
        self._reference: ArrayRecord | None = None
        self.exhausted = False
        self.exhausted_reason: str | None = None  # why, when the wrapped strategy says (client-level DP)

    # -- hooks -------------------------------------------------------------------------------
    def summary(self) -> None:
        """Log the wrapped strategy's summary and the ledger's budget."""
        self.inner.summary()
        log.info(
            "privacy ledger: %s, budget epsilon %s at delta %g", self.ledger.path, self.ledger.budget, self.ledger.delta
        )

    def can_train(self, node_id: int) -> bool:
        """Whether the client on ``node_id`` may train another round (unseen nodes check their own budget)."""
        client = self.node_to_client.get(node_id)
        if client is None:
            return True  # not seen yet: the client checks its own budget before training
        if client in self.refused:
            return False
        event = self.last_event.get(client)
        if event is None:
            return True
        verdict = self.ledger.check(client, event)
        if not verdict.allowed:
            log.info("leaving out client %s: %s", client, verdict.reason)
        return verdict.allowed

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Let the wrapped strategy sample clients, then drop those out of budget."""
        self._reference = arrays
        messages = [
            m
            for m in self.inner.configure_train(server_round, arrays, config, grid)
            if self.can_train(m.metadata.dst_node_id)
        ]
        # a client-level DP wrapper may sample no client (Poisson) and still release the noised model
        self.exhausted = not messages and not getattr(self.inner, "empty_sample", False)
        self.exhausted_reason = getattr(self.inner, "exhausted_reason", None) if self.exhausted else None
        return messages

    def _accept(self, server_round: int, message: Message) -> bool:
        node = message.metadata.src_node_id
        if message.has_error():
            log.warning("round %d: node %d replied with an error: %s", server_round, node, message.error.reason)
            self.rejected.append({"round": server_round, "node": node, "reason": message.error.reason})
            return False
        content = message.content
        extra_keys = set(getattr(self.inner, "reply_array_keys", ()))  # e.g. SCAFFOLD's control variate
        return self.accept_reply(
            server_round,
            node,
            content.config_records.get(PRIVACY_KEY),
            content.metric_records.get(METRICS_KEY),
            [record for key, record in content.array_records.items() if key not in extra_keys],
            extra=[record for key, record in content.array_records.items() if key in extra_keys],
        )

    def accept_reply(
        self,
        server_round: int,
        node: int,
        record: Any,
        metrics: Any,
        arrays: list[ArrayRecord] | None,
        extra: list[ArrayRecord] | None = None,
    ) -> bool:
        """Check one reply, record its privacy event in the ledger, and say whether it may be aggregated.

        ``arrays`` None: the update is masked (secure aggregation, :mod:`fedtune.server.secure`), so
        its keys, shapes and values cannot be checked here; everything else is. ``extra``: arrays
        the wrapped strategy consumes besides the update (SCAFFOLD's control variate), checked
        against the global model's names and shapes like the update.
        """
        if record is None:
            self.reject(server_round, node, "reply carries no privacy record")
            return False
        try:
            reply = ClientReply.from_config_record(record)
        except ValueError as err:
            self.reject(server_round, node, str(err))
            return False
        client = reply.client_id
        self.node_to_client[node] = client
        if not reply.ok:
            self.refused.add(client)
            self.reject(server_round, node, f"client {client} refused: {reply.reason}")
            return False
        if arrays is not None and len(arrays) != 1:
            self.reject(server_round, node, f"expected one ArrayRecord, got {len(arrays)}")
            return False
        private_run = self.ledger.budget is not None and math.isfinite(self.ledger.budget)
        if private_run and not reply.dp:
            self.reject(server_round, node, f"client {client} sent a non-private update in a private run")
            return False
        try:
            if self._reference is not None and arrays is not None:
                validate_update(arrays[0], self._reference)
                for other in extra or []:
                    validate_update(other, self._reference)
            if reply.dp:
                release = reply.release_event  # the label counts it released once (logit adjustment)
                if release is not None:
                    self.ledger.record(client, RELEASE_ROUND, release, reply.examples, kind="release")
                event = SubsampledGaussianEvent(reply.sampling_rate, reply.noise_multiplier, reply.steps)
                # a conflicting event for a recorded (client, round), e.g. two nodes claiming one id, is refused here
                self.ledger.record(client, server_round, event, reply.examples)
                self.last_event[client] = event
            self.replies[client] = reply
            if not reply.resent:
                totals = self.totals.setdefault(client, {"rounds": 0, "steps": 0})
                totals["rounds"] += 1
                totals["steps"] += reply.steps
            _log_client_round(server_round, reply, metrics)
        except (InvalidUpdate, ValueError, TypeError, KeyError) as err:
            self.reject(server_round, node, f"client {client}: {err}")
            return False
        return True

    def reject(self, server_round: int, node: int, reason: str) -> None:
        """Log and keep a rejected reply (also used by the secure rounds, which see replies first)."""
        log.warning("round %d: rejected the update of node %d: %s", server_round, node, reason)
        self.rejected.append({"round": server_round, "node": node, "reason": reason})

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate and record each reply, then aggregate the accepted ones with the wrapped strategy."""
        accepted = [self._in_reference_order(m) for m in replies if self._accept(server_round, m)]
        if not accepted and not getattr(self.inner, "aggregates_empty_rounds", False):
            log.warning("round %d: no valid update; the global model is unchanged", server_round)
            return None, None
        arrays, metrics = self.inner.aggregate_train(server_round, accepted)
        return self._as_reference(arrays), metrics

    def _in_reference_order(self, message: Message) -> Message:
        """Put a reply's arrays in the global model's key order (FedAvgM pairs arrays by position)."""
        if self._reference is None:
            return message
        order = list(self._reference.keys())
        for name, record in list(message.content.array_records.items()):
            if list(record.keys()) != order:
                message.content[name] = ArrayRecord({k: record[k] for k in order})
        return message

    def _as_reference(self, arrays: ArrayRecord | None) -> ArrayRecord | None:
        """The aggregate in the global model's key order and dtypes (FedAdam computes in float64)."""
        if arrays is None or self._reference is None:
            return arrays
        ref = self._reference
        if list(arrays.keys()) == list(ref.keys()) and all(arrays[k].dtype == ref[k].dtype for k in ref.keys()):
            return arrays
        return ArrayRecord({k: Array(np.asarray(arrays[k].numpy(), dtype=ref[k].numpy().dtype)) for k in ref.keys()})


def _log_client_round(server_round: int, reply: ClientReply, metrics: Any) -> None:
    """One line per client per round: steps, speed, padding efficiency, time and its certified epsilon."""
    m = dict(metrics) if metrics is not None else {}
    epsilon = reply.epsilon_certified if reply.dp else math.inf
    pad = float(m.get("padding-efficiency", -1.0))
    log.info(
        "round %d: client %s trained %d steps at q = %.4g, sigma %.4g, %.0f ex/s, "
        "padding efficiency %s, %.1f s, epsilon %s (certified)",
        server_round,
        reply.client_id,
        reply.steps,
        reply.sampling_rate,
        reply.noise_multiplier,
        float(m.get("examples-per-second", 0.0)),
        f"{pad:.0%}" if pad >= 0 else "n/a",
        float(m.get("seconds", 0.0)),
        "inf (no DP)" if math.isinf(epsilon) else f"{epsilon:.4f}",
    )
