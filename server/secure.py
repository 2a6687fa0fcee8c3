"""Secure aggregation: fedtune rounds played by Flower's SecAgg+ workflow.

With ``secure_aggregation`` on, each round of :class:`fedtune.server.run.ServerRun` is played by
Flower's :class:`~flwr.server.workflow.SecAggPlusWorkflow` (SecAgg+, Bell et al., "Secure
Single-Server Aggregation with (Poly)Logarithmic Overhead", CCS 2020; after Bonawitz et al.,
"Practical Secure Aggregation for Privacy-Preserving Machine Learning", CCS 2017), run through a
:class:`~flwr.server.LegacyContext` exactly as Flower's ``fl-dp-sa`` example does; the clients run
``secaggplus_mod`` (:mod:`fedtune.client.secure`). fedtune keeps its own loop around it (checkpoints,
the ledger, central evaluation, resume, callbacks): a secure round is a :class:`SecureRounds`
(simulation) or :class:`SecureQuorumRounds` (deployment), never a protocol of fedtune's own.

One round::

    SecureAggregation.attempt(run, r)
      LegacyContext(strategy = [SecureClientLevelDP(] MaskedMean [)], client manager = connected nodes)
      SecAggPlusWorkflow(grid = _RoundGrid(run.grid))    Flower's four stages:
        setup            clients send 2 public keys
        share keys       clients send encrypted shares of their mask seed and key to their neighbours
        collect masked   clients train (fedtune's run_job), clip (client-level DP: fixedclipping_mod),
                         quantize and mask their update; the FitRes metrics carry the ClientReply in the clear
                         -> _RoundGrid: each ClientReply goes to the server's ledger (LedgerStrategy.accept_reply);
                            a reply the server rejects is withheld from the workflow (a dropout to SecAgg+)
        unmask           survivors send shares: mask seeds of the live clients, keys of the dropped ones;
                         the server removes the masks and gets the weighted mean of the updates only
      MaskedMean.aggregate_fit: that mean (+ Gaussian noise under client-level DP, Flower's wrapper)
      new global = old global + mean update

What the server can check: each client's privacy record, the number and shapes of its masked
arrays. What it cannot: the values (norms, finiteness) of any single update; the clients bound them
(``secagg_clipping_range`` per coordinate, and the L2 clipping of ``fixedclipping_mod`` under
client-level DP). docs/privacy.md, "Secure aggregation (SecAgg+)".
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common import FitIns, FitRes, Parameters, Scalar, bytes_to_ndarray, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.compat.common import recorddict_compat as compat
from flwr.server import LegacyContext, ServerConfig
from flwr.server.client_manager import ClientManager, SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.strategy import DifferentialPrivacyClientSideFixedClipping
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid

from fedtune.config import RunConfig
from fedtune.privacy.ledger import PrivacyLedger
from fedtune.protocol import (
    SECURE_KEYS_KEY,
    SECURE_WEIGHT_KEY,
    SERVER_ROUND_KEY,
    WEIGHT_EXAMPLES,
    WEIGHT_UNIFORM,
    DeployOptions,
    split_secure_metrics,
)
from fedtune.server.client_dp import ClientLevelPlan, plan_client_level
from fedtune.server.quorum import QuorumRounds
from fedtune.server.run import STOP, RoundResult, Rounds, ServerRun, exchange, failure_reason
from fedtune.server.strategy import LedgerStrategy

__all__ = [
    "DEPLOYED_MAX_WEIGHT",
    "SecAggSettings",
    "MaskedMean",
    "SecureClientLevelDP",
    "SecureAggregation",
    "SecureRounds",
    "SecureQuorumRounds",
]

log = logging.getLogger(__name__)

#: Default ``secagg_max_weight`` of a deployment, where the server does not know the shard sizes.
DEPLOYED_MAX_WEIGHT = 100_000.0
_TRAIN_KEYS = ("train-loss", "padding-efficiency", "examples-per-second")
#: Observes every reply of a secure round: ``(stage, reply)`` (tests capture the masked vectors here).
Observer = Callable[[str, Message], None]


@dataclass(frozen=True)
class SecAggSettings:
    """The SecAgg+ parameters of a run, as :class:`~flwr.server.workflow.SecAggPlusWorkflow` takes them.

    Attributes
    ----------
    num_shares, reconstruction_threshold : int or float
        A float in (0, 1] is a fraction (of the round's clients, of the shares); an int a count.
    clipping_range : float
        Each coordinate of a client's weighted update is clipped to ``[-clipping_range, clipping_range]``.
    quantization_range : int
        Integer levels per coordinate (the quantization step is ``2 * clipping_range / quantization_range``).
    max_weight : float
        Largest client weight carried without overflow (1 when every weight is 1).
    uniform_weights : bool
        Every client weighs 1 (client-level DP) instead of its example count (FedAvg).
    """

    num_shares: int | float
    reconstruction_threshold: int | float
    clipping_range: float
    quantization_range: int
    max_weight: float
    uniform_weights: bool

    @classmethod
    def from_config(cls, config: RunConfig, *, largest_shard: int | None) -> SecAggSettings:
        """The settings of ``config``; ``largest_shard`` (a simulation's) is the default ``max_weight``."""
        uniform = config.client_level
        if uniform:
            max_weight = 1.0
        elif config.secagg_max_weight is not None:
            max_weight = float(config.secagg_max_weight)
        else:
            max_weight = float(largest_shard) if largest_shard else DEPLOYED_MAX_WEIGHT
        return cls(
            num_shares=_count_or_fraction(config.secagg_num_shares),
            reconstruction_threshold=_count_or_fraction(config.secagg_reconstruction_threshold),
            clipping_range=float(config.secagg_clipping_range),
            quantization_range=int(config.secagg_quantization_range),
            max_weight=max_weight,
            uniform_weights=uniform,
        )

    @property
    def step(self) -> float:
        """Quantization step of one coordinate of one client's weighted update."""
        return 2.0 * self.clipping_range / self.quantization_range

    def workflow(self) -> SecAggPlusWorkflow:
        """Flower's workflow with these settings (its timeouts are the round grid's, see :class:`_RoundGrid`)."""
        return SecAggPlusWorkflow(
            num_shares=self.num_shares,
            reconstruction_threshold=self.reconstruction_threshold,
            max_weight=self.max_weight,
            clipping_range=self.clipping_range,
            quantization_range=self.quantization_range,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form for summary.json."""
        return {
            "protocol": "SecAgg+ (Bell et al. 2020), Flower's SecAggPlusWorkflow + secaggplus_mod",
            "num_shares": self.num_shares,
            "reconstruction_threshold": self.reconstruction_threshold,
            "clipping_range": self.clipping_range,
            "quantization_range": self.quantization_range,
            "quantization_step": self.step,
            "max_weight": self.max_weight,
            "weights": WEIGHT_UNIFORM if self.uniform_weights else WEIGHT_EXAMPLES,
            "server_sees": "the weighted mean of each round's updates and each client's privacy record; "
            "no individual update",
        }


def _count_or_fraction(value: float) -> int | float:
    """Flower's convention: a float in (0, 1] is a fraction, an int a count."""
    return float(value) if value <= 1 else int(value)


def _weighted_train_metrics(pairs: Sequence[tuple[int, dict[str, Scalar]]]) -> dict[str, Scalar]:
    """Means of the clients' training measurements, weighted as the update (they travel in the clear)."""
    out: dict[str, Scalar] = {}
    for key in _TRAIN_KEYS:
        values = [(n, float(m[key])) for n, m in pairs if isinstance(m.get(key), (int, float)) and float(m[key]) >= 0]
        total = sum(n for n, _ in values)
        if total > 0:
            out[key] = sum(n * v for n, v in values) / total
    return out


class MaskedMean(LegacyFedAvg):
    """Flower's (legacy) FedAvg for a SecAgg+ round: every connected client that may train; the mean
    SecAgg+ computed is the aggregate.

    ``SecAggPlusWorkflow`` puts the unmasked weighted mean into every ``FitRes`` it passes to
    ``aggregate_fit``; FedAvg over identical arrays would return it up to rounding, so this returns
    it exactly. ``can_train(node_id)`` leaves out clients the ledger says are out of budget.
    """

    def __init__(self) -> None:
        super().__init__(
            fraction_fit=1.0,
            fraction_evaluate=0.0,
            min_fit_clients=2,
            min_evaluate_clients=0,
            min_available_clients=2,
            accept_failures=True,
        )
        self.round_config: dict[str, Scalar] = {}
        self.can_train: Callable[[int], bool] = lambda node: True
        self.offered = 0  # clients the round was offered to
        self.sampled = 0  # ... of which may train
        self.aggregated = 0  # updates in the SecAgg+ sum
        self.metrics: dict[str, Scalar] = {}

    def reset(self, round_config: dict[str, Scalar], can_train: Callable[[int], bool]) -> None:
        """Before a round: its FitIns config and the budget filter."""
        self.round_config, self.can_train = round_config, can_train
        self.offered = self.sampled = self.aggregated = 0
        self.metrics = {}

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        offered = super().configure_fit(server_round, parameters, client_manager)
        kept = [(proxy, FitIns(ins.parameters, dict(self.round_config))) for proxy, ins in offered]
        kept = [(proxy, ins) for proxy, ins in kept if self.can_train(proxy.node_id)]
        self.offered, self.sampled = len(offered), len(kept)
        return kept

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        self.aggregated = len(results)
        if not results:
            return None, {}
        self.metrics = _weighted_train_metrics([(res.num_examples, dict(res.metrics)) for _, res in results])
        return results[0][1].parameters, dict(self.metrics)


class SecureClientLevelDP(DifferentialPrivacyClientSideFixedClipping):
    """Flower's central-DP wrapper with client-side clipping, accounted by fedtune's ledger.

    The clients clip their updates to ``C`` (Flower's ``fixedclipping_mod``) before masking them;
    Flower's wrapper adds :math:`N(0, (\\sigma C / K)^2)` to the securely aggregated mean, as in
    Flower's ``fl-dp-sa`` example. The mechanism and its accounting are those of
    :mod:`fedtune.server.client_dp` with every client in every round (``q = 1``): the ledger checks
    the budget before a round (certified) and records one server event per released round. A
    round with fewer than all ``K`` updates (a dropout, a client out of its own budget) releases
    nothing: the noise is calibrated for a mean over ``K``.

    Attributes
    ----------
    plan : ClientLevelPlan
    ledger : PrivacyLedger
    last_round : dict
        ``clients`` and ``noise_std`` of the last release (update norms are masked: not reported).
    exhausted_reason : str or None
        Why the last round could not be played.
    """

    def __init__(self, strategy: MaskedMean, plan: ClientLevelPlan, ledger: PrivacyLedger) -> None:
        if plan.clients_per_round != plan.clients:  # RunConfig refuses this combination first
            raise ValueError(
                f"secure client-level DP needs every client in every round, got M = {plan.clients_per_round} "
                f"of K = {plan.clients}"
            )
        super().__init__(strategy, plan.noise_multiplier, plan.clipping_norm, plan.clients)
        self.plan, self.ledger = plan, ledger
        self.last_round: dict[str, float] = {}
        self.exhausted_reason: str | None = None

    def __repr__(self) -> str:
        plan = self.plan
        return f"SecureClientLevelDP(sigma={plan.noise_multiplier:.4g}, C={plan.clipping_norm:g}, K={plan.clients})"

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        """The ledger's budget check, Flower's configure_fit (adds the clipping norm), all ``K`` clients."""
        self.exhausted_reason = None
        verdict = self.ledger.check_server(self.plan.event, self.plan.epsilon)
        if not verdict.allowed:
            self.exhausted_reason = verdict.reason
            return []
        instructions = super().configure_fit(server_round, parameters, client_manager)
        if len(instructions) != self.plan.clients:
            self.exhausted_reason = (
                f"client-level DP with secure aggregation needs all {self.plan.clients} clients in round "
                f"{server_round}, {len(instructions)} can train"
            )
            return []
        return instructions

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Flower's wrapper (noise on the mean), only for a round with all ``K`` updates; then the ledger."""
        if failures or len(results) != self.plan.clients:
            log.warning(
                "round %d: client-level DP releases nothing: %d of %d updates, %d failure(s)",
                server_round,
                len(results),
                self.plan.clients,
                len(failures),
            )
            return None, {}
        parameters, metrics = super().aggregate_fit(server_round, results, failures)
        if parameters is not None:
            self.ledger.record_server_event(server_round, self.plan.event)
            self.last_round = {"clients": float(len(results)), "noise_std": self.plan.noise_std}
        return parameters, metrics


@dataclass
class _RoundGrid:
    """The run's grid as SecAgg+ sees it for one round.

    ``send_and_receive`` is fedtune's :func:`~fedtune.server.run.exchange` (stops on Ctrl-C, bounded
    by ``timeout``). Every stage-2 reply (the masked update) hands its :class:`~fedtune.protocol.ClientReply`
    to the server's ledger; a reply the server rejects, or whose masked arrays do not have the
    global model's shapes, is withheld from the workflow, which then treats the client as dropped
    (SecAgg+ removes its masks with its neighbours' shares).
    """

    grid: Grid
    server_round: int
    strategy: LedgerStrategy
    shapes: list[tuple[int, ...]]
    timeout: float
    stop: Any = STOP
    observers: Sequence[Observer] = ()
    errors: list[str] = field(default_factory=list)
    bytes_sent: int = 0
    bytes_received: int = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.grid, name)

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        if not messages:
            return []
        stage = str(messages[0].content.config_records[RECORD_KEY_CONFIGS][Key.STAGE])
        self.bytes_sent += sum(_content_bytes(m.content) for m in messages)
        replies = exchange(self.grid, messages, self.timeout if timeout is None else timeout, self.stop)
        kept: list[Message] = []
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                reason = f"secure aggregation, stage {stage}: {reply.error.reason}"
                self.errors.append(reason)
                self.strategy.reject(self.server_round, node, reason)
                kept.append(reply)  # Flower's workflow counts it as a dropout
                continue
            for observe in self.observers:
                observe(stage, reply)
            if stage == Stage.COLLECT_MASKED_VECTORS and not self._accept(node, reply):
                continue
            kept.append(reply)
        if len(replies) < len(messages):
            self.errors.append(f"{len(messages) - len(replies)} client(s) sent no reply at stage {stage}")
        return kept

    def _accept(self, node: int, reply: Message) -> bool:
        """The privacy record to the ledger, the masked arrays' shapes checked (their values cannot be)."""
        content = reply.content
        metrics = content.config_records.get("fitres.metrics")
        privacy, rest = split_secure_metrics(dict(metrics) if metrics is not None else {})
        if not self.strategy.accept_reply(self.server_round, node, privacy, rest, None):
            return False
        value = content.config_records[RECORD_KEY_CONFIGS].get(Key.MASKED_PARAMETERS)
        masked = [b for b in value if isinstance(b, bytes)] if isinstance(value, list) else []
        arrays = [bytes_to_ndarray(b) for b in masked]
        shapes = [tuple(a.shape) for a in arrays[1:]]  # the first array is the masked weight
        if shapes != self.shapes:
            self.strategy.reject(
                self.server_round, node, f"masked update has shapes {shapes[:3]}..., expected {self.shapes[:3]}..."
            )
            return False
        self.bytes_received += sum(len(b) for b in masked)
        return True


def _content_bytes(content: RecordDict) -> int:
    arrays = sum(len(a.data) for record in content.array_records.values() for a in record.values())
    masked = sum(
        len(b)
        for record in content.config_records.values()
        for value in record.values()
        if isinstance(value, list)
        for b in value
        if isinstance(b, bytes)
    )
    return int(arrays + masked)


class SecureAggregation:
    """Plays one round of a run under SecAgg+ (see the module docstring).

    Parameters
    ----------
    config : RunConfig
    ledger : PrivacyLedger
        The server's ledger (client events via :class:`LedgerStrategy`, server events under
        client-level DP).
    largest_shard : int or None
        A simulation's largest shard (the default SecAgg+ ``max_weight``); None in a deployment.
    timeout : float
        Seconds to wait for each of the four stages.
    observers : sequence of callables
        ``observer(stage, reply)`` for every reply (a test hook: what the server receives).
    """

    def __init__(
        self,
        config: RunConfig,
        ledger: PrivacyLedger,
        *,
        largest_shard: int | None = None,
        timeout: float = 3600.0,
        observers: Sequence[Observer] = (),
    ) -> None:
        self.settings = SecAggSettings.from_config(config, largest_shard=largest_shard)
        self.timeout = timeout
        self.observers = list(observers)
        self.mean = MaskedMean()
        plan = plan_client_level(config)
        self.client_level = SecureClientLevelDP(self.mean, plan, ledger) if plan is not None else None
        self.strategy: DifferentialPrivacyClientSideFixedClipping | MaskedMean = self.client_level or self.mean

    def describe(self) -> dict[str, Any]:
        """summary.json's ``secure_aggregation`` block."""
        return self.settings.to_dict()

    def attempt(self, run: ServerRun, rnd: int) -> RoundResult | None:
        """Play round ``rnd`` once; None when no client can train within its budget.

        A round whose protocol halted (too few clients or shares) comes back with
        ``clients_trained = 0``, the global model unchanged and the reasons in ``errors``.
        """
        start = time.perf_counter()
        strategy = run.strategy
        strategy.exhausted, strategy.exhausted_reason = False, None
        keys = list(run.arrays.keys())
        reference = [run.arrays[k].numpy() for k in keys]
        nodes = list(run.grid.get_node_ids())
        weight = WEIGHT_UNIFORM if self.settings.uniform_weights else WEIGHT_EXAMPLES
        self.mean.reset(
            {SERVER_ROUND_KEY: rnd, SECURE_KEYS_KEY: "\n".join(keys), SECURE_WEIGHT_KEY: weight}, strategy.can_train
        )
        grid = _RoundGrid(run.grid, rnd, strategy, [a.shape for a in reference], self.timeout, run.stop, self.observers)
        context = self._context(run, rnd, nodes)
        if len(nodes) >= 2:
            self.settings.workflow()(cast(Grid, grid), context)  # duck-typed: Flower calls send_and_receive
        else:
            grid.errors.append(f"secure aggregation needs at least 2 connected clients, {len(nodes)} connected")
        dp_reason = self.client_level.exhausted_reason if self.client_level is not None else None
        if dp_reason or (len(nodes) >= 2 and self.mean.offered and not self.mean.sampled):
            strategy.exhausted = True
            strategy.exhausted_reason = dp_reason
            return None
        if 0 < self.mean.sampled < 2:
            grid.errors.append(f"secure aggregation needs at least 2 clients in a round, {self.mean.sampled} may train")
        out = context.state.array_records[MAIN_PARAMS_RECORD]
        aggregated = list(out.keys()) != keys
        arrays = run.arrays
        if aggregated:
            mean = parameters_to_ndarrays(compat.arrayrecord_to_parameters(out, keep_input=True))
            arrays = ArrayRecord(
                {
                    key: Array(np.asarray(old.astype(np.float64) + np.asarray(delta, np.float64), dtype=old.dtype))
                    for key, old, delta in zip(keys, reference, mean, strict=True)
                }
            )
        elif not grid.errors:
            grid.errors.append("the SecAgg+ protocol halted without an aggregate (too few clients or shares)")
        trained = self.mean.aggregated if aggregated else 0
        return RoundResult(
            round=rnd,
            arrays=arrays,
            clients_trained=trained,
            clients_rejected=max(self.mean.sampled - trained, 0),
            bytes_sent=grid.bytes_sent,
            bytes_received=grid.bytes_received,
            seconds=time.perf_counter() - start,
            train_metrics=dict(self.mean.metrics) if aggregated else {},
            errors=list(grid.errors),
        )

    def _context(self, run: ServerRun, rnd: int, nodes: list[int]) -> LegacyContext:
        """A LegacyContext holding the global model, the round, and the connected nodes as Flower's client manager."""
        manager = SimpleClientManager()
        for node in nodes:
            manager.register(GridClientProxy(node, run.grid, 0))
        context = LegacyContext(
            Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}),
            config=ServerConfig(num_rounds=run.config.rounds),
            strategy=self.strategy,
            client_manager=manager,
        )
        context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
            {WorkflowKey.CURRENT_ROUND: rnd, WorkflowKey.START_TIME: time.time()}
        )
        context.state.array_records[MAIN_PARAMS_RECORD] = run.arrays
        return context


class SecureRounds(Rounds):
    """A simulation's secure rounds: every client, one SecAgg+ attempt per round.

    A client that drops out is handled as SecAgg+ allows (its masks are removed with its neighbours'
    shares and the round aggregates the others); a round without an aggregate stops the run.
    """

    def __init__(self, secure: SecureAggregation) -> None:
        self.secure = secure

    def play(self, run: ServerRun, rnd: int) -> RoundResult | str:
        result = self.secure.attempt(run, rnd)
        if result is None:
            return f"round {rnd}: " + (run.strategy.exhausted_reason or "no client can train within its privacy budget")
        if result.clients_trained == 0:
            run.failed = True
            return f"round {rnd}: secure aggregation failed: " + failure_reason(result.errors or ["no aggregate"])
        if result.errors:
            log.warning(
                "round %d: %d client(s) dropped out of secure aggregation; the round aggregates the other %d: %s",
                rnd,
                result.clients_rejected,
                result.clients_trained,
                "; ".join(e[:200] for e in result.errors),
            )
        return result


class SecureQuorumRounds(QuorumRounds):
    """A deployment's secure rounds: :class:`~fedtune.server.quorum.QuorumRounds` (wait, retry, quorum),
    each attempt a SecAgg+ round."""

    def __init__(self, secure: SecureAggregation, options: DeployOptions, expected_clients: int) -> None:
        super().__init__(options, expected_clients)
        self.secure = secure

    def attempt(self, run: ServerRun, rnd: int) -> RoundResult | None:
        return self.secure.attempt(run, rnd)


def client_level_of(rounds: Rounds) -> SecureClientLevelDP | None:
    """The secure client-level DP wrapper of ``rounds``, if it plays secure rounds with client-level DP."""
    secure = getattr(rounds, "secure", None)
    return secure.client_level if isinstance(secure, SecureAggregation) else None


def secure_summary(rounds: Rounds) -> dict[str, Any] | None:
    """summary.json's ``secure_aggregation`` block (None when the rounds are not secure)."""
    secure = getattr(rounds, "secure", None)
    return secure.describe() if isinstance(secure, SecureAggregation) else None
