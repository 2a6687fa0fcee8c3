r"""Client-level DP (DP-FedAvg) on the server: Flower's DP strategy wrapper, accounted by fedtune.

Record-level DP (each client's DP-SGD) protects one *example*. Client-level DP protects a client's
*whole contribution*: the server bounds each client's model update and adds Gaussian noise to the
sum (McMahan et al., "Learning Differentially Private Recurrent Language Models", ICLR 2018,
arXiv 1710.06963; Andrew et al. 2021, arXiv 1905.03871). One round releases

.. math::

    x_{t+1} = x_t + \frac{1}{M}\Big(\sum_{k \in S_t} \operatorname{clip}_C(x_k - x_t)
              + \mathcal N(0, \sigma^2 C^2 I)\Big),
    \qquad \operatorname{clip}_C(v) = v \min\big(1, C / \lVert v \rVert_2\big),

where ``S_t`` is the round's sample of the ``K`` clients and ``M`` its expected size. Adding or
removing one client changes the sum by at most ``C`` in L2, so one round is the Gaussian mechanism
with noise multiplier :math:`\sigma`, subsampled with rate ``q = M / K`` when each client takes
part independently with probability ``q`` (Poisson sampling). ``rounds`` rounds compose to
``rounds`` :class:`~fedtune.privacy.events.SubsampledGaussianEvent` steps ``(q, sigma)``: exactly
the events fedtune's accountants certify for DP-SGD, so :func:`plan_client_level` calibrates
:math:`\sigma` with the same certified pipeline and the ledger stores one server event per round.

Which code does the work
------------------------
* ``q = 1`` (every client every round, the default): Flower's
  ``DifferentialPrivacyServerSideFixedClipping`` as Flower ships it, with fedtune's
  :class:`~fedtune.privacy.flower_accountant.FlowerPrivacyAccountant` (no amplification; Flower
  checks the budget before each round and refuses a round whose reply count differs from ``K``).
* ``q < 1``: Flower's wrapper accounts only for ``q = 1``, and its FedAvg divides by the number of
  replies, which itself depends on who was sampled. :class:`ClientLevelDP` then samples clients
  by Poisson sampling with secret randomness and divides by the fixed ``M`` (the estimator of
  McMahan et al. 2018 with a fixed denominator), using Flower's own clipping and noise functions.

In both cases the server's ledger records the round's event (idempotent per round, so a resumed
run counts nothing twice) and refuses a round that would take the certified client-level
epsilon over its budget. Client-level DP needs FedAvg as the server optimizer: Flower's wrapper
adds the noise to its inner strategy's output, and an adaptive server optimizer inside it would
keep un-noised state across rounds.
"""

from __future__ import annotations

import logging
import math
import random
import secrets
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.exception import PrivacyBudgetExhausted
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg
from flwr.serverapp.strategy.dp_fixed_clipping import validate_replies
from flwr.supercore.differential_privacy import compute_clip_model_update, get_norm
from flwr.supercore.privacy_accounting import (
    GaussianPrivacyEvent,
    NeighboringRelation,
    PrivacyConfig,
    SamplingMethod,
)

from fedtune.config import RunConfig
from fedtune.privacy.calibration import calibrate_noise
from fedtune.privacy.events import SubsampledGaussianEvent
from fedtune.privacy.flower_accountant import FlowerPrivacyAccountant
from fedtune.privacy.ledger import PrivacyLedger

__all__ = ["ClientLevelPlan", "ClientLevelDP", "UNIFORM_WEIGHT_KEY", "plan_client_level", "wrap_client_level"]

log = logging.getLogger(__name__)

#: Metric key the server adds (value 1.0) to each accepted reply so FedAvg weighs clients equally,
#: as client-level sensitivity requires. It never travels: clients do not send it.
UNIFORM_WEIGHT_KEY = "client-level-dp-weight"


@dataclass(frozen=True)
class ClientLevelPlan:
    """The client-level DP mechanism of a run: who is sampled, the clipping norm and the noise.

    Attributes
    ----------
    epsilon, delta : float
        The client-level budget over all rounds.
    clients : int
        Population ``K``.
    clients_per_round : int
        Expected sample ``M`` (``q = M / K``).
    rounds : int
        Rounds the noise is calibrated for.
    clipping_norm : float
        ``C``, the L2 bound on each client's update.
    noise_multiplier : float
        :math:`\\sigma` (certified: the certifier's bound at ``rounds`` rounds meets ``epsilon``).
    certified_epsilon : float
        The certified epsilon of all ``rounds`` rounds at ``delta``.
    """

    epsilon: float
    delta: float
    clients: int
    clients_per_round: int
    rounds: int
    clipping_norm: float
    noise_multiplier: float
    certified_epsilon: float

    @property
    def sampling_rate(self) -> float:
        """``q = M / K``."""
        return self.clients_per_round / self.clients

    @property
    def event(self) -> SubsampledGaussianEvent:
        """One round's privacy event (one step of the subsampled Gaussian mechanism)."""
        return SubsampledGaussianEvent(self.sampling_rate, self.noise_multiplier, 1)

    @property
    def noise_std(self) -> float:
        """Standard deviation of the noise on the averaged update, :math:`\\sigma C / M`."""
        return self.noise_multiplier * self.clipping_norm / self.clients_per_round

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (with ``sampling_rate`` and ``noise_std``)."""
        return {**asdict(self), "sampling_rate": self.sampling_rate, "noise_std": self.noise_std}


def plan_client_level(config: RunConfig) -> ClientLevelPlan | None:
    """Calibrate the server's noise for ``config`` (None when client-level DP is off).

    The noise multiplier is the certified one of :func:`fedtune.privacy.calibration.calibrate_noise`
    for ``rounds`` steps at ``q = M / K``.
    """
    if not config.client_level:
        return None
    q = config.sampled_clients / config.clients
    calibration = calibrate_noise(
        config.client_level_epsilon, config.delta, q, config.rounds, accountant=config.accountant
    )
    return ClientLevelPlan(
        epsilon=config.client_level_epsilon,
        delta=config.delta,
        clients=config.clients,
        clients_per_round=config.sampled_clients,
        rounds=config.rounds,
        clipping_norm=config.update_clipping_norm,
        noise_multiplier=calibration.sigma,
        certified_epsilon=float(calibration.certified_epsilon),  # type: ignore[arg-type]
    )


def flower_accountant(plan: ClientLevelPlan, ledger: PrivacyLedger) -> FlowerPrivacyAccountant:
    """Flower's view of the budget (``q = 1`` only), holding the rounds the ledger already recorded."""
    accountant = FlowerPrivacyAccountant(
        PrivacyConfig(
            target_delta=plan.delta,
            population_size=plan.clients,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION,
            max_epsilon=plan.epsilon,
        )
    )
    done = len(ledger.server_events())
    if done:
        accountant.compose(GaussianPrivacyEvent(plan.noise_multiplier, plan.clients, plan.clients), done)
    return accountant


class ClientLevelDP(DifferentialPrivacyServerSideFixedClipping):
    """Flower's server-side fixed-clipping DP wrapper, with Poisson client sampling and a ledger.

    Parameters
    ----------
    strategy : FedAvg
        Flower's FedAvg, weighing replies by :data:`UNIFORM_WEIGHT_KEY` (see :func:`wrap_client_level`).
    plan : ClientLevelPlan
        The calibrated mechanism.
    ledger : PrivacyLedger
        The server's ledger: one server event per released round; budget checks (certified).
    rng : random.Random, optional
        Client sampling randomness (default: the operating system's secret source). Seed it only
        in tests: a predictable sample voids the amplification by sampling.

    Attributes
    ----------
    last_round : dict
        The last released round: ``clients`` in the sample, ``update_norm_median`` and
        ``clipped_fraction`` (of the pre-clip update norms), ``noise_std``.
    """

    def __init__(
        self, strategy: FedAvg, plan: ClientLevelPlan, ledger: PrivacyLedger, *, rng: random.Random | None = None
    ) -> None:
        if not isinstance(strategy, FedAvg) or type(strategy).aggregate_train is not FedAvg.aggregate_train:
            raise ValueError(f"client-level DP wraps Flower's FedAvg, got {type(strategy).__name__}")
        self.plan = plan
        self.ledger = ledger
        self.poisson = plan.sampling_rate < 1.0
        super().__init__(
            strategy,
            noise_multiplier=plan.noise_multiplier,
            clipping_norm=plan.clipping_norm,
            num_sampled_clients=plan.clients_per_round,
            accountant=None if self.poisson else flower_accountant(plan, ledger),
        )
        self._rng = rng if rng is not None else secrets.SystemRandom()
        self.last_round: dict[str, float] = {}
        self.exhausted_reason: str | None = None
        #: The last Poisson sample was empty although clients were available: the round still
        #: releases (noise only), see :meth:`aggregate_train`.
        self.empty_sample = False

    #: Tells :class:`~fedtune.server.strategy.LedgerStrategy` to aggregate a round with no reply.
    aggregates_empty_rounds = True

    def __repr__(self) -> str:
        plan = self.plan
        return f"ClientLevelDP(q={plan.sampling_rate:.4g}, sigma={plan.noise_multiplier:.4g}, C={plan.clipping_norm:g})"

    # -- configure ---------------------------------------------------------------------------
    def budget_left(self) -> bool:
        """Whether one more round stays within the client-level budget (certified bound)."""
        verdict = self.ledger.check_server(self.plan.event, self.plan.epsilon)
        self.exhausted_reason = None if verdict.allowed else verdict.reason
        return verdict.allowed

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> list[Message]:
        """Flower's configure_train (every node), then each client kept with probability ``q``."""
        if not self.budget_left():
            return []
        try:
            offered = list(super().configure_train(server_round, arrays, config, grid))
        except (ValueError, PrivacyBudgetExhausted) as err:
            # Flower's accounted path (q = 1) refuses a sample other than all K clients, or its budget
            self.exhausted_reason = (
                f"client-level DP (every client in every round) cannot play round {server_round}: {err}"
            )
            if "num_sampled_clients" in str(err):
                self.exhausted_reason += (
                    f"; it needs all {self.plan.clients} clients connected (--clients-per-round M < "
                    f"{self.plan.clients} samples clients instead)"
                )
            return []
        messages = offered
        if self.poisson:
            q = self.plan.sampling_rate
            messages = [m for m in offered if self._rng.random() < q]
        self.empty_sample = bool(offered) and not messages
        return messages

    # -- aggregate ---------------------------------------------------------------------------
    def aggregate_train(self, server_round: int, replies: Any) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Clip each update to ``C``, average with weight ``1/M``, add :math:`N(0, (\\sigma C/M)^2)`.

        ``q = 1``: Flower's own ``aggregate_train`` (a reply count other than ``K`` releases
        nothing). ``q < 1``: the same steps with Flower's functions, a fixed denominator ``M``, and
        a release even when no client was sampled (the noise alone), since skipping it would
        reveal an empty sample.
        """
        replies = [self._uniform(r) for r in replies]
        norms = [self._update_norm(r) for r in replies if not r.has_error()]
        if not self.poisson and any(n == 0 for n in norms):
            # Flower's clipping divides by the norm; an unchanged model is no training: release nothing
            log.warning("round %d: a client sent back the global model unchanged; no release this round", server_round)
            return None, None
        if self.poisson:
            arrays, metrics = self._aggregate_poisson(server_round, replies)
        else:
            arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is None:
            log.warning("round %d: no client-level DP release (%d replies)", server_round, len(replies))
            return None, metrics
        self.ledger.record_server_event(server_round, self.plan.event)
        self.last_round = {
            "clients": float(len(norms)),
            "update_norm_median": float(np.median(norms)) if norms else 0.0,
            "clipped_fraction": float(np.mean([n > self.clipping_norm for n in norms])) if norms else 0.0,
            "noise_std": self.plan.noise_std,
        }
        log.info(
            "round %d: client-level DP over %d clients: update norms median %.4g, %.0f%% clipped to %g, "
            "noise std %.4g on the mean",
            server_round,
            len(norms),
            self.last_round["update_norm_median"],
            100 * self.last_round["clipped_fraction"],
            self.clipping_norm,
            self.plan.noise_std,
        )
        return arrays, metrics

    def _aggregate_poisson(
        self, server_round: int, replies: list[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if not validate_replies(replies, self.num_sampled_clients, strict=False):
            return None, None  # a reply was an error: Flower releases nothing
        current = self.current_arrays.to_numpy_ndarrays()
        keys = list(self.current_arrays.keys())
        total = [np.zeros_like(a, dtype=np.float64) for a in current]
        for reply in replies:
            for name, record in reply.content.array_records.items():
                clipped = record.to_numpy_ndarrays()
                if get_norm([np.subtract(x, y) for x, y in zip(clipped, current, strict=True)]) > 0:
                    compute_clip_model_update(param1=clipped, param2=current, clipping_norm=self.clipping_norm)
                for acc, new, old in zip(total, clipped, current, strict=True):
                    acc += np.asarray(new, dtype=np.float64) - old
                reply.content[name] = ArrayRecord(
                    dict(zip(record.keys(), (Array(np.asarray(v)) for v in clipped), strict=True))
                )
        metrics = self.strategy.aggregate_train(server_round, replies)[1] if replies else None
        mean = ArrayRecord(
            {
                key: Array(np.asarray(old + acc / self.num_sampled_clients, dtype=old.dtype))
                for key, old, acc in zip(keys, current, total, strict=True)
            }
        )
        return self._add_noise_to_aggregated_arrays(mean), metrics

    def _update_norm(self, reply: Message) -> float:
        record = next(iter(reply.content.array_records.values()))
        current = self.current_arrays
        return get_norm([record[k].numpy() - current[k].numpy() for k in current.keys()])

    @staticmethod
    def _uniform(reply: Message) -> Message:
        """Add :data:`UNIFORM_WEIGHT_KEY` = 1 to the reply's metrics (client-level sensitivity: equal weights)."""
        if reply.has_error():
            return reply
        for name, metrics in list(reply.content.metric_records.items()):
            reply.content[name] = MetricRecord({**dict(metrics), UNIFORM_WEIGHT_KEY: 1.0})
        return reply


def wrap_client_level(
    config: RunConfig, ledger: PrivacyLedger, min_nodes: int, *, rng: random.Random | None = None
) -> ClientLevelDP:
    """FedAvg with equal client weights, wrapped for client-level DP as ``config`` asks."""
    plan = plan_client_level(config)
    if plan is None:
        raise ValueError("client-level DP is off (client_level_epsilon = inf)")
    fedavg = FedAvg(
        fraction_train=1.0,
        fraction_evaluate=0.0,
        min_train_nodes=min_nodes,
        min_available_nodes=min_nodes,
        weighted_by_key=UNIFORM_WEIGHT_KEY,
    )
    if not math.isfinite(plan.noise_multiplier):  # pragma: no cover - calibrate_noise returns finite sigmas
        raise ValueError(f"calibration gave sigma = {plan.noise_multiplier}")
    return ClientLevelDP(fedavg, plan, ledger, rng=rng)
