r"""SCAFFOLD's server side: a strategy wrapper that keeps the global control variate.

SCAFFOLD (Karimireddy et al., "SCAFFOLD: Stochastic Controlled Averaging for Federated Learning",
ICML 2020) corrects each client's local steps for its drift from the global objective. Client
:math:`k` keeps a control variate :math:`c_k` (its mean gradient) and the server the global
:math:`c`; every local step follows :math:`g + c - c_k` instead of :math:`g`
(:func:`fedtune.client.job.scaffold_correction`, :class:`fedtune.train.GradientHook`).

Under record-level DP the variates are built from the privatized gradients (DP-SCAFFOLD, Noble,
Bellet and Dieuleveut, AISTATS 2022, arXiv 2111.09278): :math:`c_k` is the mean of the clipped and
noised gradients of the client's latest round, a post-processing of outputs the accountant already
counts, so sending it costs no privacy.

This wrapper adds to Flower's strategy, without editing it:

* ``configure_train`` attaches :math:`c` to every train message (:data:`~fedtune.protocol.CONTROL_KEY`);
* ``aggregate_train`` takes each reply's :math:`c_k` out of the message (the wrapped strategy
  sees only the model update), stores it by client, passes the rest on, and sets

  .. math:: c = \sum_k \frac{N_k}{\sum_j N_j}\, c_k

  over every client that has reported so far, with its latest :math:`c_k` and example count
  :math:`N_k`: FedAvg's weights, so :math:`c` estimates the gradient of the same global objective.
  (SCAFFOLD's incremental :math:`c \mathrel{+}= \frac{|S|}{N} \sum_{k \in S} \Delta c_k` is the
  same with full participation and uniform weights; keeping each :math:`c_k` makes re-sent rounds
  idempotent and late joiners exact.)

:class:`~fedtune.server.strategy.LedgerStrategy` wraps this one and validates the variate like
the update (names, shapes, finite values) before anything is aggregated. The state (each
:math:`c_k` and :math:`N_k`) goes into the round checkpoint
(:func:`fedtune.server.optimizers.strategy_state`), so a resumed run continues it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedtune.protocol import CONTROL_KEY, METRICS_KEY, PRIVACY_KEY, ClientReply
from fedtune.server.strategy import WrappingStrategy

__all__ = ["Scaffold", "SCAFFOLD_SLOT"]

log = logging.getLogger(__name__)

#: Prefix of the checkpoint slots holding each client's control variate (``scaffold:<client>``).
SCAFFOLD_SLOT = "scaffold:"
#: Checkpoint slot of the clients' example counts.
_EXAMPLES_SLOT = "scaffold-examples"


class Scaffold(WrappingStrategy):
    """Wrap ``inner`` (any Flower strategy) with SCAFFOLD's global control variate.

    Parameters
    ----------
    inner : Strategy
        The server optimizer (Flower's FedAvg, FedAvgM, FedAdam, FedYogi); it aggregates the
        model updates exactly as without SCAFFOLD.
    """

    #: Reply ArrayRecords this wrapper consumes (LedgerStrategy validates them like the update).
    reply_array_keys = (CONTROL_KEY,)

    def __init__(self, inner: Strategy) -> None:
        super().__init__(inner)
        self.controls: dict[str, dict[str, np.ndarray]] = {}
        self.examples: dict[str, int] = {}

    # -- the global variate --------------------------------------------------------------------
    def global_control(self, like: ArrayRecord) -> ArrayRecord:
        r""":math:`c = \sum_k N_k c_k / \sum_k N_k` over the clients seen, zeros (shaped like ``like``) before any."""
        total = sum(self.examples[k] for k in self.controls)
        out: dict[str, Array] = {}
        for key in like.keys():
            acc = np.zeros(like[key].shape, dtype=np.float64)
            for client, control in self.controls.items():
                acc += (self.examples[client] / total) * control[key]
            out[key] = Array(acc.astype(np.float32))
        return ArrayRecord(out)

    # -- hooks ---------------------------------------------------------------------------------
    def summary(self) -> None:
        """The wrapped strategy's summary, then SCAFFOLD's."""
        self.inner.summary()
        log.info("SCAFFOLD client-drift correction (control variates from the privatized gradients)")

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The wrapped strategy's messages, each carrying the global control variate."""
        control = self.global_control(arrays)
        messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        for message in messages:
            message.content[CONTROL_KEY] = control
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Store each reply's control variate, then aggregate the model updates with the wrapped strategy."""
        replies = list(replies)
        for message in replies:
            record = message.content.array_records.get(CONTROL_KEY)
            if record is None:
                continue  # e.g. a re-sent round whose variate was lost: the client's last c_k stays
            del message.content[CONTROL_KEY]
            reply = ClientReply.from_config_record(message.content.config_records[PRIVACY_KEY])
            examples = int(message.content.metric_records[METRICS_KEY]["num-examples"])  # type: ignore[arg-type]
            self.controls[reply.client_id] = {k: np.asarray(record[k].numpy(), dtype=np.float32) for k in record.keys()}
            self.examples[reply.client_id] = max(1, examples)
        return self.inner.aggregate_train(server_round, replies)

    # -- checkpoint ----------------------------------------------------------------------------
    def state(self) -> dict[str, dict[str, np.ndarray]]:
        """Checkpoint slots: ``scaffold:<client>`` (its c_k) and ``scaffold-examples`` (client -> N_k)."""
        if not self.controls:
            return {}
        out = {SCAFFOLD_SLOT + client: {k: v.copy() for k, v in c.items()} for client, c in self.controls.items()}
        out[_EXAMPLES_SLOT] = {client: np.array(n, dtype=np.int64) for client, n in self.examples.items()}
        return out

    def load_state(self, state: dict[str, dict[str, np.ndarray]]) -> None:
        """Put :meth:`state` back (slots of other kinds are ignored; missing ones reset the variate).

        Raises
        ------
        ValueError
            If a client's variate has no example count.
        """
        controls = {
            slot[len(SCAFFOLD_SLOT) :]: {k: np.array(v, dtype=np.float32) for k, v in arrays.items()}
            for slot, arrays in state.items()
            if slot.startswith(SCAFFOLD_SLOT)
        }
        counts = {k: int(v) for k, v in state.get(_EXAMPLES_SLOT, {}).items()}
        missing = sorted(set(controls) - set(counts))
        if missing:
            raise ValueError(f"the saved SCAFFOLD state has control variates without example counts for {missing}")
        self.controls, self.examples = controls, {k: counts[k] for k in controls}

    @staticmethod
    def owns(slot: str) -> bool:
        """Whether a checkpoint slot is SCAFFOLD's."""
        return slot.startswith(SCAFFOLD_SLOT) or slot == _EXAMPLES_SLOT
