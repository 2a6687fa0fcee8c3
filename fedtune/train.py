"""Local training: non-private, or DP-SGD built from Opacus components with exact accounting.

Used by a federated client for its local steps in each round, and by the centralized
baseline. :func:`train_local` trains a deep copy of the model it is given (or the model
itself with ``in_place=True``) and returns the trained adapter and head weights
(:func:`fedtune.model.get_trainable_state`).

DP mode (``TrainConfig.noise_multiplier`` set) is the sampled Gaussian mechanism the
accountants assume, one *logical* step at a time:

* **Poisson sampling** at exactly ``q = batch_size / N``: every example joins each logical
  batch independently with probability ``q`` (Opacus' ``UniformWithReplacementSampler``), so
  batch sizes vary and a batch can be empty. (Opacus' ``make_private`` would use
  ``1 / len(data_loader)``, which is not ``B / N`` unless ``B`` divides ``N``.)
* **Physical micro-batches**: the sampled logical batch is ordered by length and cut into
  micro-batches of at most ``physical_batch_size`` examples, each padded only to its own
  longest example (:mod:`fedtune.batching`). Memory is bounded by the micro-batch, not by the
  logical batch; sorting after sampling leaves the sampled set, hence the mechanism, unchanged.
* **Per-example clipping** to L2 norm ``C = max_grad_norm`` over *all* trainable
  parameters (LoRA A/B and head), from per-sample gradients of Opacus'
  ``GradSampleModule``; the clipped gradients of every micro-batch of a logical step are
  summed (``DPOptimizer.signal_skip_step``) before any noise is drawn.
* **Gaussian noise**: one draw of std ``noise_multiplier * C`` per logical step, added to
  the sum of clipped gradients, which is then divided by the *expected* batch size ``B``
  (``DPOptimizer``), never by the realised one.
* **Secret randomness**: by default the sampling and the noise come from fresh OS entropy,
  not from ``TrainConfig.seed`` (see ``TrainConfig.dp_randomness``).
* **Empty batches are steps**: the update is pure noise, the step is counted in
  ``TrainResult.steps`` and ``TrainResult.empty_batches``. Skipping them would change the
  mechanism the accountant is told about.

Why not Opacus' ``BatchMemoryManager``: it splits each Poisson batch in sampling order with
``np.array_split`` (so every chunk pads to whatever long sentence it happens to hold), and it
signals the optimizer from inside the data loader's sampler, which ties the clipping schedule
to the loader's iteration. Here the training loop itself marks the last micro-batch of each
logical step, on top of the same Opacus components (sampler, ``GradSampleModule``,
``DPOptimizer`` and its skip-step API).

Optional bf16 autocast (``TrainConfig.precision = "bf16"``) runs the forward and backward
passes in bfloat16 where the hardware supports it; per-sample gradients are cast to float32
*before* their norms are taken, so clipping bounds exactly the values that are summed.

Opacus is attached for one call and every hook and per-parameter attribute is removed
before returning, so nothing piles up across federated rounds.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import ctypes.util
import functools
import gc
import logging
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence, Sized
from dataclasses import dataclass
from typing import Any, Literal, cast

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fedtune.batching import MicroBatch, PackedDataset, auto_physical_batch_size, pack_dataset
from fedtune.model import _unwrap, get_trainable_state
from fedtune.optim import OPTIMIZERS as _OPTIMIZERS
from fedtune.optim import SCHEDULES as _SCHEDULES
from fedtune.optim import OptimizerName, ScheduleName, set_lr

__all__ = [
    "PRECISIONS",
    "EmptySafeCollator",
    "StepProgress",
    "TrainConfig",
    "TrainResult",
    "as_packed",
    "attach_dp",
    "autocast_context",
    "batch_size_of",
    "bf16_supported",
    "detach_dp",
    "dp_logical_step",
    "label_counts",
    "logit_adjustment",
    "dp_step",
    "make_optimizer",
    "OptimizerStateError",
    "load_optimizer_state",
    "plain_logical_step",
    "plain_step",
    "poisson_batches",
    "poisson_loader",
    "MemoryGuard",
    "release_memory",
    "resolve_physical_batch_size",
    "shuffled_batches",
    "train_local",
]

logger = logging.getLogger(__name__)

DPRandomness = Literal["secret", "seeded"]
_DP_RANDOMNESS: tuple[str, ...] = ("secret", "seeded")
Precision = Literal["fp32", "bf16"]
PRECISIONS: tuple[str, ...] = ("fp32", "bf16")


def _check_int(name: str, value: Any, low: int, high: int | None = None) -> None:
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if not ok or value < low or (high is not None and value > high):
        bounds = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be an integer {bounds}, got {value!r}")


def _check_float(
    name: str,
    value: Any,
    low: float,
    *,
    low_inclusive: bool,
    high: float | None = None,
    high_inclusive: bool = False,
) -> None:
    ok = isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, bool)
    if ok:
        ok = math.isfinite(value) and (value >= low if low_inclusive else value > low)
        if ok and high is not None:
            ok = value <= high if high_inclusive else value < high
    if not ok:
        lo = "[" if low_inclusive else "("
        hi = (f"{high}]" if high_inclusive else f"{high})") if high is not None else "inf)"
        raise ValueError(f"{name} must be a finite number in {lo}{low}, {hi}, got {value!r}")


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one local training run.

    Parameters
    ----------
    batch_size : int
        Expected batch size ``B`` (>= 1). DP mode samples each example with probability
        ``q = B / N`` and divides the noisy gradient sum by ``B``; non-private mode uses
        ordinary shuffled batches of ``B``.
    steps : int
        Number of optimizer steps (>= 1), empty Poisson batches included.
    learning_rate : float
        > 0. The default 2e-3 suits AdamW on LoRA (B starts at zero) and the new head.
    max_grad_norm : float
        Per-example clipping norm ``C`` (> 0); used in DP mode only.
    noise_multiplier : float or None
        ``sigma`` (>= 0): noise std is ``sigma * C`` on the clipped sum. ``None`` selects
        the non-private mode: no clipping, no noise, no per-sample gradients. ``0.0`` clips
        without noise (no privacy; useful to isolate clipping).
    optimizer : {"adamw", "sgd", "adambc"}
        Default ``"adamw"``: LoRA ``A``/``B`` and the head have very different gradient
        scales, and under DP the clipped-and-noised gradient's scale depends on ``C`` and
        ``B``; Adam's per-coordinate normalization makes one learning rate work for all of
        them. ``"adambc"`` is DP-AdamBC (:class:`fedtune.optim.DPAdamBC`): Adam with the DP
        noise variance ``(sigma C / B)^2`` subtracted from its second moment (AdamW when
        not private). All only post-process the privatized gradient: privacy is unaffected.
    weight_decay : float
        Decoupled (AdamW) or L2 (SGD) weight decay, >= 0. Default 0: the adapter starts at
        zero and local runs are short.
    momentum : float
        SGD momentum in [0, 1); ignored by AdamW.
    seed : int or None
        Seeds dropout and the non-private batch shuffling (the caller's global RNG state is
        restored afterwards); also the DP sampling and noise if ``dp_randomness="seeded"``.
        ``None`` draws fresh seeds from the OS.
    dp_randomness : {"secret", "seeded"}
        Where DP-SGD's Poisson sampling and Gaussian noise get their randomness. Default
        ``"secret"``: fresh OS entropy on every call, because anyone who can recompute the
        noise (e.g. a server that knows the run's seed) can subtract it from the update, and
        anyone who knows which examples were sampled loses the amplification by
        subsampling: the DP guarantee would not hold against them. ``"seeded"`` derives
        both from ``seed`` for reproducible experiments; the guarantee then only holds
        against parties who do not know the seed. (The generators are torch's, not a
        CSPRNG; Opacus' ``secure_mode`` is not used.)
    log_every : int
        Call the progress callback every this many logical steps (>= 1), and at the end.
    physical_batch_size : int or None
        Most examples per micro-batch (>= 1). ``None`` picks one from the model, the longest
        example and the device (:func:`fedtune.batching.auto_physical_batch_size`). Changes
        memory and speed only: the logical batch, the noise and the accounting are unchanged.
    precision : {"fp32", "bf16"}
        ``"bf16"`` runs forward and backward under bfloat16 autocast (CPUs with AVX512-BF16 or
        AMX, recent GPUs); the weights, the optimizer, clipping and noise stay float32. A
        ValueError names the device if it lacks bf16 support.
    lr_schedule : {"constant", "linear", "cosine"}
        Learning rate over the whole plan (:func:`fedtune.optim.scheduled_lr`).
    warmup_steps : int
        Linear warm-up steps at the start of the plan (>= 0, < ``plan_steps``).
    plan_steps : int or None
        Steps of the whole plan the schedule spans (a federated client: all its rounds);
        None = ``steps``.
    plan_offset : int
        Plan steps taken before this call (a client's earlier rounds), >= 0; this call runs
        plan steps ``plan_offset + 1 .. plan_offset + steps``.
    """

    batch_size: int = 32
    steps: int = 50
    learning_rate: float = 2e-3
    max_grad_norm: float = 1.0
    noise_multiplier: float | None = None
    optimizer: OptimizerName = "adamw"
    weight_decay: float = 0.0
    momentum: float = 0.0
    seed: int | None = 0
    dp_randomness: DPRandomness = "secret"
    log_every: int = 10
    physical_batch_size: int | None = None
    precision: Precision = "fp32"
    lr_schedule: ScheduleName = "constant"
    warmup_steps: int = 0
    plan_steps: int | None = None
    plan_offset: int = 0

    def __post_init__(self) -> None:
        _check_int("batch_size", self.batch_size, 1)
        _check_int("steps", self.steps, 1)
        _check_float("learning_rate", self.learning_rate, 0.0, low_inclusive=False)
        _check_float("max_grad_norm", self.max_grad_norm, 0.0, low_inclusive=False)
        if self.noise_multiplier is not None:
            _check_float("noise_multiplier", self.noise_multiplier, 0.0, low_inclusive=True)
        if self.optimizer not in _OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(_OPTIMIZERS)}, got {self.optimizer!r}")
        _check_float("weight_decay", self.weight_decay, 0.0, low_inclusive=True)
        _check_float("momentum", self.momentum, 0.0, low_inclusive=True, high=1.0)
        if self.seed is not None:
            _check_int("seed", self.seed, 0, 2**63 - 1)
        if self.dp_randomness not in _DP_RANDOMNESS:
            raise ValueError(f"dp_randomness must be one of {', '.join(_DP_RANDOMNESS)}, got {self.dp_randomness!r}")
        _check_int("log_every", self.log_every, 1)
        if self.physical_batch_size is not None:
            _check_int("physical_batch_size", self.physical_batch_size, 1)
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.lr_schedule not in _SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {', '.join(_SCHEDULES)}, got {self.lr_schedule!r}")
        _check_int("plan_offset", self.plan_offset, 0)
        if self.plan_steps is not None:
            _check_int("plan_steps", self.plan_steps, 1)
            if self.plan_offset + self.steps > self.plan_steps:
                raise ValueError(
                    f"plan_offset + steps = {self.plan_offset + self.steps} exceeds plan_steps = {self.plan_steps}"
                )
        _check_int("warmup_steps", self.warmup_steps, 0)
        if self.warmup_steps >= self.total_plan_steps:
            raise ValueError(
                f"warmup_steps must be < the plan's {self.total_plan_steps} steps, got {self.warmup_steps!r}"
            )

    @property
    def total_plan_steps(self) -> int:
        """Steps the learning-rate schedule spans (``plan_steps``, else ``steps``)."""
        return self.plan_steps if self.plan_steps is not None else self.plan_offset + self.steps

    def lr_at(self, step: int) -> float:
        """Learning rate of this run's ``step`` (1-based) under the plan's schedule."""
        from fedtune.optim import scheduled_lr

        return scheduled_lr(
            self.learning_rate,
            self.plan_offset + step,
            self.total_plan_steps,
            schedule=self.lr_schedule,
            warmup=self.warmup_steps,
        )

    @property
    def private(self) -> bool:
        """Whether this is a DP-SGD run (``noise_multiplier`` is set)."""
        return self.noise_multiplier is not None


@dataclass(frozen=True)
class TrainResult:
    """Outcome of :func:`train_local`.

    Attributes
    ----------
    state : dict of str to torch.Tensor
        Trained adapter and head weights (CPU), as :func:`fedtune.model.get_trainable_state`.
    steps : int
        Optimizer steps taken, empty Poisson batches included.
    sampling_rate : float
        ``q = B / N`` (DP: the exact Poisson inclusion probability the accountant needs;
        non-private: the nominal batch fraction, ``min(1, B / N)``).
    noise_multiplier : float or None
        ``sigma``; ``None`` for a non-private run.
    max_grad_norm : float or None
        Clipping norm ``C``; ``None`` for a non-private run.
    num_examples : int
        ``N``, the size of the local training set.
    examples_seen : int
        Sum of the realised batch sizes.
    mean_loss : float
        Example-weighted mean training loss over the steps (NaN if every batch was empty).
    seconds : float
        Wall-clock time of the run.
    empty_batches : int
        Steps whose Poisson batch was empty (noise-only updates).
    real_tokens, computed_tokens : int
        Non-padding tokens processed, and tokens computed (padding included).
    physical_batch_size : int
        The micro-batch size used.
    precision : str
        ``"fp32"`` or ``"bf16"``.
    optimizer_state : dict or None
        The optimizer's ``state_dict()`` after the last step (CPU tensors), for a stateful
        client to pass back as ``train_local(..., optimizer_state=...)`` next round.
    mean_gradient : dict of str to torch.Tensor or None
        With ``track_mean_gradient``: each trainable parameter's gradient as the optimizer
        received it (under DP the privatized one: clipped, noised, divided by ``B``), before any
        ``gradient_correction``, averaged over the steps (CPU, float32). A SCAFFOLD client's
        new control variate.
    """

    state: dict[str, torch.Tensor]
    steps: int
    sampling_rate: float
    noise_multiplier: float | None
    max_grad_norm: float | None
    num_examples: int
    examples_seen: int
    mean_loss: float
    seconds: float
    empty_batches: int
    real_tokens: int = 0
    computed_tokens: int = 0
    physical_batch_size: int = 0
    precision: str = "fp32"
    optimizer_state: dict[str, Any] | None = None
    mean_gradient: dict[str, torch.Tensor] | None = None

    @property
    def padding_efficiency(self) -> float:
        """Real tokens over computed tokens (NaN if nothing was computed)."""
        return self.real_tokens / self.computed_tokens if self.computed_tokens else math.nan

    @property
    def examples_per_second(self) -> float:
        """Examples processed per wall-clock second."""
        return self.examples_seen / self.seconds if self.seconds > 0 else math.nan


@dataclass(frozen=True)
class StepProgress:
    """Progress report passed to the ``progress`` callback of :func:`train_local`.

    ``batch_size`` is the realised size of the latest logical batch; ``examples_seen``,
    ``real_tokens`` and ``computed_tokens`` count everything so far.
    """

    step: int
    total_steps: int
    batch_size: int
    loss: float | None
    mean_loss: float
    seconds: float
    examples_seen: int = 0
    real_tokens: int = 0
    computed_tokens: int = 0

    @property
    def examples_per_second(self) -> float:
        return self.examples_seen / self.seconds if self.seconds > 0 else math.nan

    @property
    def padding_efficiency(self) -> float:
        return self.real_tokens / self.computed_tokens if self.computed_tokens else math.nan

    @property
    def eta_seconds(self) -> float:
        """Remaining seconds at the mean pace so far."""
        return self.seconds / self.step * (self.total_steps - self.step) if self.step else math.nan


ProgressCallback = Callable[[StepProgress], None]


class EmptySafeCollator:
    """Wrap a dict collator so that an empty list of examples gives an empty batch.

    Poisson sampling can draw no example at all. ``DataCollatorWithPadding`` fails on an
    empty list, and Opacus' own empty-batch handling (``DPDataLoader``) only learns the
    batch structure from an earlier non-empty batch: when the *first* batch is empty and
    the dataset yields dicts, it crashes. This wrapper returns a dict of zero-row
    ``int64`` tensors (``(0, 0)`` for token columns, ``(0,)`` for labels) instead.

    Parameters
    ----------
    collator : callable
        Collates a non-empty list of examples (dicts) into a dict of tensors.
    columns : sequence of str
        The dataset's columns (``label`` is renamed ``labels`` like the HF collators do).
    """

    def __init__(self, collator: Callable[[list[Any]], Any], columns: Sequence[str]) -> None:
        self.collator = collator
        self.columns = tuple("labels" if c == "label" else c for c in columns)

    def __call__(self, examples: list[Any]) -> Any:
        if len(examples) > 0:
            return self.collator(examples)
        return {
            c: torch.zeros((0,) if c in ("labels", "label_ids") else (0, 0), dtype=torch.long) for c in self.columns
        }


def _columns(dataset: Dataset) -> list[str]:
    names = getattr(dataset, "column_names", None)
    if names is not None:
        return list(names)
    first = dataset[0]
    if not isinstance(first, Mapping):
        raise ValueError(f"examples must be dicts of features, got {type(first).__name__}")
    return list(first.keys())


def batch_size_of(batch: Mapping[str, Any]) -> int:
    """Number of examples in a collated batch (rows of its first tensor)."""
    for value in batch.values():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
    raise ValueError(f"batch has no tensor to count rows of (keys {list(batch)})")


def poisson_loader(
    dataset: Dataset,
    collator: Callable[[list[Any]], Any],
    sample_rate: float,
    generator: torch.Generator,
) -> DataLoader:
    """Data loader whose batches include each example independently with ``sample_rate``.

    Uses Opacus' ``UniformWithReplacementSampler`` (the sampler of ``DPDataLoader``) with
    the exact ``sample_rate`` and an :class:`EmptySafeCollator`. One pass yields
    ``int(1 / sample_rate)`` batches; iterate it repeatedly for more.
    """
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    _check_float("sample_rate", sample_rate, 0.0, low_inclusive=False, high=1.0, high_inclusive=True)
    sampler = UniformWithReplacementSampler(
        num_samples=len(cast(Sized, dataset)), sample_rate=sample_rate, generator=generator
    )
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=EmptySafeCollator(collator, _columns(dataset)),
    )


def make_optimizer(params: Sequence[nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer named by ``config.optimizer`` (:func:`fedtune.optim.make_optimizer`); Opacus wraps it.

    DP-AdamBC gets the noise variance per coordinate of the averaged gradient,
    ``(sigma C / B)^2`` (0 when not private).
    """
    from fedtune.optim import make_optimizer as build

    sigma = config.noise_multiplier
    phi = 0.0 if sigma is None else (sigma * config.max_grad_norm / config.batch_size) ** 2
    return build(
        params,
        config.optimizer,
        config.learning_rate,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        noise_variance=phi,
    )


def _optimizer_state_to_cpu(state: dict[str, Any]) -> dict[str, Any]:
    def cpu(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return value.detach().to("cpu", copy=True)
        if isinstance(value, dict):
            return {k: cpu(v) for k, v in value.items()}
        if isinstance(value, list):
            return [cpu(v) for v in value]
        return value

    return cast(dict[str, Any], cpu(state))


class OptimizerStateError(ValueError):
    """A saved optimizer state that does not fit this run (:func:`load_optimizer_state`)."""


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: Mapping[str, Any], config: TrainConfig) -> None:
    """Load a stateful client's saved optimizer state, keeping this run's hyper-parameters.

    Only the per-parameter state (momentum, Adam moments, step counts) is carried over; the
    learning rate, momentum factor, noise variance etc. are this run's. A ValueError names the
    mismatch (an :class:`OptimizerStateError`) if the state belongs to another optimizer or another
    set of parameters.
    """
    groups = state.get("param_groups") if isinstance(state, Mapping) else None
    per_param = state.get("state") if isinstance(state, Mapping) else None
    if (
        not isinstance(groups, list)
        or not all(isinstance(g, Mapping) for g in groups)
        or not isinstance(per_param, Mapping)
    ):
        raise OptimizerStateError("the saved optimizer state is not a torch optimizer state_dict")
    kind = state.get("fedtune_optimizer")
    if kind is not None and kind != config.optimizer:
        raise OptimizerStateError(
            f"the saved optimizer state is {kind!r}, this run's optimizer is {config.optimizer!r}"
        )
    saved = [len(g.get("params", [])) for g in groups]
    current = [len(g["params"]) for g in optimizer.param_groups]
    if saved != current:
        raise OptimizerStateError(
            f"the saved optimizer state has parameter groups of sizes {saved}, this model's are {current}; "
            "it belongs to another model or another LoRA configuration"
        )
    # torch's load_state_dict matches parameters by position only: check every saved tensor's
    # shape, or a state of another LoRA rank (same parameter count) would load and fail mid-step.
    fresh = optimizer.state_dict()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    saved_ids = [i for g in groups for i in g.get("params", [])]
    for position, saved_id in enumerate(saved_ids):
        entry = per_param.get(saved_id)
        if entry is None:
            continue
        if not isinstance(entry, Mapping):
            raise OptimizerStateError(
                f"the saved optimizer state of parameter {position} is a {type(entry).__name__}, not a mapping"
            )
        param = params[position]
        for key, value in entry.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != param.shape:
                raise OptimizerStateError(
                    f"the saved optimizer state's {key!r} of parameter {position} has shape {tuple(value.shape)}, "
                    f"this model's parameter has shape {tuple(param.shape)}; it belongs to another model or "
                    "another LoRA configuration"
                )
    unknown = sorted(set(per_param) - set(saved_ids), key=str)
    if unknown:
        raise OptimizerStateError(f"the saved optimizer state has state for unknown parameter ids {unknown}")
    # torch maps the state's ids through the groups loaded with it: renumber to this optimizer's ids.
    # Copy the tensors: torch keeps them as they are (same dtype and device) and steps them in place,
    # which would silently advance the caller's saved state too.
    fresh_ids = [i for g in fresh["param_groups"] for i in g["params"]]
    remapped = {
        new: _optimizer_state_to_cpu(dict(per_param[old]))
        for old, new in zip(saved_ids, fresh_ids, strict=True)
        if old in per_param
    }
    optimizer.load_state_dict({"state": remapped, "param_groups": fresh["param_groups"]})


def attach_dp(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    expected_batch_size: int,
    noise_generator: torch.Generator | None = None,
) -> tuple[nn.Module, Any]:
    """Wrap ``model`` in a ``GradSampleModule`` and ``optimizer`` in a ``DPOptimizer``.

    Per-sample gradients use Opacus' hooks (``loss_reduction="mean"``: the HF loss is a
    batch mean); the optimizer clips each example's gradient to ``max_grad_norm`` over all
    trainable parameters, adds ``N(0, (noise_multiplier * max_grad_norm)^2)`` to the sum
    and divides by ``expected_batch_size``. Call :func:`detach_dp` when done.

    Returns
    -------
    grad_sample_module : opacus.GradSampleModule
    dp_optimizer : opacus.optimizers.DPOptimizer
    """
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=True)
    gsm.forbid_grad_accumulation()  # Poisson batches must not be accumulated silently
    dp_optimizer = DPOptimizer(
        optimizer,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        expected_batch_size=expected_batch_size,
        loss_reduction="mean",
        generator=noise_generator,
    )
    return gsm, dp_optimizer


def detach_dp(grad_sample_module: nn.Module) -> nn.Module:
    """Remove every Opacus hook and per-parameter attribute; return the bare model."""
    gsm: Any = grad_sample_module  # an Opacus GradSampleModule (nn.Module attributes are typed Tensor | Module)
    inner: nn.Module = gsm._module
    gsm._close()
    for param in inner.parameters():
        for attr in ("summed_grad", "grad_sample", "_forward_counter", "_current_grad_sample"):
            if hasattr(param, attr):
                delattr(param, attr)
    for module in inner.modules():
        for attr in ("activations", "max_batch_len"):
            if attr in module.__dict__:
                delattr(module, attr)
    return inner


def _to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _loss(model: nn.Module, batch: Mapping[str, Any], logit_offset: torch.Tensor | None = None) -> torch.Tensor:
    r"""The batch's mean loss: the model's own, or with ``logit_offset`` the logit-adjusted cross-entropy
    :math:`\frac1n \sum_i -\log \mathrm{softmax}(f(x_i) + \delta)_{y_i}` (Menon et al. 2021)."""
    if logit_offset is None:
        loss = model(**batch).loss
        if loss is None:
            raise ValueError(f"the model returned no loss: batches need a 'labels' column (got {list(batch)})")
        return loss
    if "labels" not in batch:
        raise ValueError(f"logit adjustment needs a 'labels' column (got {list(batch)})")
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits
    return nn.functional.cross_entropy(logits.float() + logit_offset, batch["labels"])


def label_counts(labels: torch.Tensor | Sequence[int], num_labels: int) -> torch.Tensor:
    """How many of ``labels`` carry each label ``0 .. num_labels - 1`` (float64).

    Raises
    ------
    ValueError
        Fewer than 2 labels, or a label out of range.
    """
    if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 2:
        raise ValueError(f"num_labels must be an integer >= 2, got {num_labels!r}")
    values = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    if values.numel() and (int(values.min()) < 0 or int(values.max()) >= num_labels):
        raise ValueError(
            f"labels must be in [0, {num_labels}), got values from {int(values.min())} to {int(values.max())}"
        )
    return torch.bincount(values, minlength=num_labels).to(torch.float64)


def logit_adjustment(counts: torch.Tensor | np.ndarray | Sequence[float], tau: float) -> torch.Tensor:
    r"""The logit offset :math:`\tau \log \hat\pi` of a client's label counts (Menon et al., ICLR 2021).

    :math:`\hat\pi_c = (n_c^+ + 1) / \sum_{c'} (n_{c'}^+ + 1)`, with :math:`n_c^+ = \max(n_c, 0)`, is
    the add-one smoothed share of label :math:`c`, so a label the client never saw gets a large
    negative, finite offset. The counts may be noisy (a private release, where they can come out
    negative). Training on ``logits + offset`` (:func:`train_local`'s ``logit_offset``) makes the
    model's plain logits estimate the label-balanced posterior: a client whose data all carry one
    label no longer pushes the shared head toward that label.

    Parameters
    ----------
    counts : tensor, array or sequence of float
        One count per label (:func:`label_counts`, or a noisy release of it), at least 2, finite.
    tau : float
        Finite, ``>= 0``; 0 gives zeros (plain cross-entropy).

    Raises
    ------
    ValueError
        Fewer than 2 counts, a count not finite, or ``tau`` negative or not finite.
    """
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0.0 <= tau < math.inf:
        raise ValueError(f"tau must be a finite number >= 0, got {tau!r}")
    values = torch.as_tensor(counts, dtype=torch.float64).reshape(-1)
    if values.numel() < 2 or not bool(torch.isfinite(values).all()):
        raise ValueError(f"counts must be at least 2 finite numbers (one per label), got {values.tolist()!r}")
    smoothed = values.clamp(min=0.0) + 1.0
    return (float(tau) * (smoothed / smoothed.sum()).log()).to(torch.float32)


def autocast_context(device: torch.device, precision: str) -> Any:
    """``torch.autocast`` for ``precision`` on ``device`` (a no-op context for ``"fp32"``).

    Raises
    ------
    ValueError
        ``"bf16"`` on a device without bfloat16 support, naming the device.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp32":
        return contextlib.nullcontext()
    if not bf16_supported(device):
        raise ValueError(
            f"precision 'bf16' needs bfloat16 support, which device {device} lacks "
            "(CPUs with AVX512-BF16 or AMX, CUDA GPUs of compute capability 8.0 or newer); use 'fp32'"
        )
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def bf16_supported(device: torch.device | str = "cpu") -> bool:
    """Whether ``device`` runs bfloat16 matrix products natively (AVX512-BF16/AMX or CUDA sm80+)."""
    device = torch.device(device)
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):  # pragma: no cover - torch without oneDNN
            return False
    return False


def _float32_grad_samples(params: Sequence[nn.Parameter]) -> None:
    # Under autocast the per-sample gradients come out in bf16; clip what is summed, in fp32.
    for param in params:
        sample = getattr(param, "grad_sample", None)
        if isinstance(sample, torch.Tensor) and sample.dtype != param.dtype:
            cast(Any, param).grad_sample = sample.to(param.dtype)  # Opacus' per-sample gradient attribute


def plain_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, batch: Mapping[str, Any], device: torch.device
) -> float:
    """One non-private step on one batch: mean loss over the batch, backward, optimizer step."""
    optimizer.zero_grad(set_to_none=True)
    loss = _loss(model, _to_device(batch, device))
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def dp_step(
    grad_sample_module: nn.Module,
    dp_optimizer: Any,
    batch: Mapping[str, Any],
    device: torch.device,
) -> float | None:
    """One DP-SGD step on a (possibly empty) Poisson batch taken as a single micro-batch.

    Same as :func:`dp_logical_step` with one micro-batch (or none, for an empty batch).
    After the call ``p.grad`` holds the privatized gradient and ``p.summed_grad`` the sum of
    clipped per-sample gradients, until the next step.

    Returns
    -------
    float or None
        The batch's mean loss, or ``None`` for an empty batch.
    """
    size = batch_size_of(batch)
    micro = [MicroBatch(dict(batch), size, 0, 0)] if size else []
    loss_sum, examples = dp_logical_step(grad_sample_module, dp_optimizer, micro, device)
    return loss_sum / examples if examples else None


def dp_logical_step(
    grad_sample_module: nn.Module,
    dp_optimizer: Any,
    micro_batches: Sequence[MicroBatch],
    device: torch.device,
    precision: str = "fp32",
    logit_offset: torch.Tensor | None = None,
) -> tuple[float, int]:
    """One DP-SGD logical step over the micro-batches of one Poisson batch.

    For every micro-batch: forward, backward (Opacus computes per-sample gradients), then
    ``DPOptimizer.step`` clips each example's gradient to ``C`` and adds it to
    ``p.summed_grad``. All but the last micro-batch are marked as skipped steps
    (``signal_skip_step``), so the sum accumulates and no noise is drawn; the last one draws
    the step's single noise sample ``N(0, (sigma C)^2)``, divides by the expected batch size
    and updates the weights. An empty logical batch is one step all the same: zero-row
    per-sample gradients, so the update is the noise alone.

    Returns
    -------
    loss_sum : float
        Sum over the examples of their loss (0 for an empty batch).
    examples : int
        The realised logical batch size.
    """
    params = dp_optimizer.params
    dp_optimizer.zero_grad(set_to_none=True)
    if not micro_batches:
        for param in params:
            param.grad_sample = torch.zeros((0, *param.shape), dtype=param.dtype, device=param.device)
        dp_optimizer.signal_skip_step(do_skip=False)
        dp_optimizer.step()
        return 0.0, 0
    loss_sum, examples = 0.0, 0
    last = len(micro_batches) - 1
    for index, micro in enumerate(micro_batches):
        with autocast_context(device, precision):
            loss = _loss(grad_sample_module, _to_device(micro.batch, device), logit_offset)
        with warnings.catch_warnings():
            # Opacus' full backward hooks on layers whose inputs need no grad (frozen embeddings
            # below the first adapter): expected and harmless.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            loss.backward()
        if precision != "fp32":
            _float32_grad_samples(params)
        dp_optimizer.signal_skip_step(do_skip=index < last)
        dp_optimizer.step()
        if index < last:
            dp_optimizer.zero_grad(set_to_none=True)  # drops per-sample grads, keeps the clipped sum
        loss_sum += float(loss.detach()) * micro.size
        examples += micro.size
    return loss_sum, examples


def plain_logical_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: Sequence[MicroBatch],
    device: torch.device,
    precision: str = "fp32",
    logit_offset: torch.Tensor | None = None,
) -> tuple[float, int]:
    """One non-private step over the micro-batches of one logical batch.

    Gradients of ``loss_j * n_j / n`` are accumulated over micro-batches ``j`` (``n_j``
    examples each, ``n`` in all), which is the gradient of the logical batch's mean loss.

    Returns
    -------
    loss_sum : float
        Sum over the examples of their loss.
    examples : int
        The logical batch size.
    """
    optimizer.zero_grad(set_to_none=True)
    total = sum(m.size for m in micro_batches)
    if total == 0:
        return 0.0, 0
    loss_sum = 0.0
    for micro in micro_batches:
        with autocast_context(device, precision):
            loss = _loss(model, _to_device(micro.batch, device), logit_offset)
        (loss * (micro.size / total)).backward()
        loss_sum += float(loss.detach()) * micro.size
    optimizer.step()
    return loss_sum, total


class GradientHook:
    """A step pre-hook on an optimizer that records the mean gradient and adds a fixed correction.

    Registered on the plain torch optimizer, so under DP it sees the gradient Opacus' DPOptimizer
    hands it: clipped, summed, noised and divided by the expected batch size. Micro-batches that
    only accumulate (Opacus' skipped steps) never reach it.

    For step :math:`t` with gradient :math:`g_t` it keeps :math:`\\sum_t g_t` and then sets
    ``p.grad`` to :math:`g_t + (c - c_k)`. After :math:`K` steps :meth:`mean` is
    :math:`c_k^+ = \frac1K \\sum_t g_t`: with SGD this is SCAFFOLD's option II,
    :math:`c_k - c + (x - y_k)/(K \\eta)` (Karimireddy et al. 2020, eq. 4), and it stays the mean
    gradient whatever the optimizer does with it.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        named: Mapping[str, nn.Parameter],
        correction: Mapping[str, torch.Tensor] | None,
        device: torch.device,
    ) -> None:
        if correction is not None:
            if set(correction) != set(named):
                missing, extra = sorted(set(named) - set(correction)), sorted(set(correction) - set(named))
                raise ValueError(
                    f"gradient_correction must name exactly the trainable parameters: missing {missing[:3]}, "
                    f"unknown {extra[:3]}"
                )
            for name, param in named.items():
                if tuple(correction[name].shape) != tuple(param.shape):
                    raise ValueError(
                        f"gradient_correction[{name!r}] has shape {tuple(correction[name].shape)}, "
                        f"the parameter {tuple(param.shape)}"
                    )
        self.named = dict(named)
        self.correction = (
            None
            if correction is None
            else {k: torch.as_tensor(v, dtype=torch.float32).to(device) for k, v in correction.items()}
        )
        self.sums = {k: torch.zeros_like(p, dtype=torch.float32) for k, p in self.named.items()}
        self.steps = 0
        self._handle = optimizer.register_step_pre_hook(self._pre_step)

    def _pre_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.steps += 1
        with torch.no_grad():
            for name, param in self.named.items():
                if param.grad is None:  # no gradient reached it (cannot happen under DP: noise is added)
                    param.grad = torch.zeros_like(param)
                self.sums[name] += param.grad.float()
                if self.correction is not None:
                    param.grad += self.correction[name].to(param.grad.dtype)

    def mean(self) -> dict[str, torch.Tensor]:
        """:math:`\frac1K \\sum_t g_t` per parameter (CPU float32; zeros before any step)."""
        return {k: (v / max(1, self.steps)).to("cpu") for k, v in self.sums.items()}

    def remove(self) -> None:
        """Unregister the hook."""
        self._handle.remove()


def _seeds(seed: int | None, count: int) -> list[int]:
    entropy = seed if seed is not None else int.from_bytes(os.urandom(8), "little")
    return [int(s) for s in np.random.SeedSequence(entropy).generate_state(count, dtype=np.uint64) >> 1]


def poisson_batches(num_examples: int, sample_rate: float, generator: torch.Generator) -> Iterator[np.ndarray]:
    """Endless Poisson logical batches: each example joins each batch with ``sample_rate``.

    Opacus' ``UniformWithReplacementSampler`` draws them (one pass is ``int(1 / q)`` batches;
    passes are chained), so batch sizes are Binomial(N, q) and a batch may be empty.
    """
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    _check_float("sample_rate", sample_rate, 0.0, low_inclusive=False, high=1.0, high_inclusive=True)
    sampler = UniformWithReplacementSampler(num_samples=num_examples, sample_rate=sample_rate, generator=generator)
    while True:
        for indices in sampler:
            yield np.asarray(indices, dtype=np.int64)


def shuffled_batches(num_examples: int, batch_size: int, generator: torch.Generator) -> Iterator[np.ndarray]:
    """Endless non-private batches: reshuffle every epoch, batches of ``batch_size`` (last one smaller)."""
    while True:
        order = torch.randperm(num_examples, generator=generator).numpy()
        for start in range(0, num_examples, batch_size):
            yield order[start : start + batch_size]


def as_packed(train_dataset: Any, collator: Any) -> PackedDataset:
    """``train_dataset`` as a :class:`~fedtune.batching.PackedDataset` (packed with the collator's tokenizer)."""
    if isinstance(train_dataset, PackedDataset):
        return train_dataset
    tokenizer = getattr(collator, "tokenizer", None)
    if tokenizer is None:
        raise ValueError(
            "train_local needs a PackedDataset, or a collator with a .tokenizer (e.g. "
            f"DataCollatorWithPadding) to pack the dataset with; got collator {type(collator).__name__}"
        )
    return pack_dataset(train_dataset, tokenizer)


def resolve_physical_batch_size(
    config: TrainConfig, model: nn.Module, data: PackedDataset, device: torch.device
) -> int:
    """``config.physical_batch_size``, or the automatic choice for this model, data and device."""
    if config.physical_batch_size is not None:
        return min(config.physical_batch_size, max(1, len(data)))
    model_config = getattr(_unwrap(model), "config", None)
    return auto_physical_batch_size(
        model_config,
        max(1, data.max_length),
        device,
        logical_batch_size=max(1, len(data)),
        element_bytes=2 if config.precision == "bf16" else 4,
    )


def release_memory(collect: bool = True) -> None:
    """Return freed heap memory to the operating system (glibc ``malloc_trim``; no-op elsewhere).

    Why the RSS of a training process grows: micro-batches of varying widths allocate
    activations of many sizes. glibc serves blocks above its mmap threshold with ``mmap`` at
    first, but every such block freed raises the threshold (up to 32 MiB), so later activations
    come from the heap arenas, and the freed holes between live blocks are never given back.
    RSS then creeps up with every new shape (measured: +500 MB over 60 steps at batch 256, and
    more every round). ``malloc_trim(0)`` releases those free pages (``madvise``) without moving
    anything. Fixing the mmap threshold instead keeps RSS flat but was 1.7x slower (every
    activation is a fresh, zeroed mapping).
    """
    if collect:
        gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


class MemoryGuard:
    """Trim the heap when the process's RSS has grown ``slack_bytes`` past its working set.

    Called after every logical step. The working set is the largest RSS over the first
    ``warmup_steps`` steps: it includes the freed activations glibc keeps for reuse, which are
    fast to reuse and must not be trimmed every step (that made steps 1.5x slower: every
    activation faulted in again). Fragmentation then grows RSS slowly past it; once the growth
    exceeds ``slack_bytes`` the heap is trimmed (:func:`release_memory`) and RSS falls back
    below the working set. Reading RSS costs microseconds.
    """

    def __init__(self, slack_bytes: int = 256 << 20, warmup_steps: int = 5) -> None:
        import psutil

        self._process = psutil.Process()
        self.slack_bytes = slack_bytes
        self.warmup_steps = warmup_steps
        self.trims = 0
        self.steps = 0
        self.working_set = 0

    def __call__(self) -> None:
        rss = self._process.memory_info().rss
        self.steps += 1
        if self.steps <= self.warmup_steps:
            self.working_set = max(self.working_set, rss)
            if (
                self.steps == self.warmup_steps
            ):  # start from a clean heap: fragmentation of the warm-up is not working set
                release_memory(collect=False)
        elif rss > self.working_set + self.slack_bytes:
            release_memory(collect=False)
            self.trims += 1


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        return None


def train_local(
    model: nn.Module,
    train_dataset: Dataset | PackedDataset,
    collator: Callable[[list[Any]], Any] | None,
    config: TrainConfig,
    device: torch.device | str = "cpu",
    *,
    progress: ProgressCallback | None = None,
    in_place: bool = False,
    optimizer_state: Mapping[str, Any] | None = None,
    gradient_correction: Mapping[str, torch.Tensor] | None = None,
    track_mean_gradient: bool = False,
    logit_offset: torch.Tensor | None = None,
) -> TrainResult:
    """Train ``model`` for ``config.steps`` logical steps; return its trainable state.

    Parameters
    ----------
    model : torch.nn.Module
        A peft model (:func:`fedtune.model.build_peft_model`). Left unchanged unless
        ``in_place``.
    train_dataset : datasets.Dataset or PackedDataset
        Tokenized examples (dicts with ``input_ids``, ``attention_mask``, ``labels``, ...),
        e.g. from :func:`fedtune.data.tokenize.tokenize_dataset`, or the same packed once with
        :func:`fedtune.batching.pack_dataset` (a client reuses that across rounds).
    collator : callable or None
        A collator with a ``tokenizer`` (``DataCollatorWithPadding``), used to pack an
        unpacked dataset with the tokenizer's padding; not needed for a PackedDataset.
    config : TrainConfig
        Steps, logical and physical batch size, learning rate, precision and, for DP-SGD,
        ``noise_multiplier`` and ``max_grad_norm``.
    device : torch.device or str
        Where to train.
    progress : callable, optional
        Called with a :class:`StepProgress` every ``config.log_every`` steps and at the end.
    in_place : bool
        Train ``model`` itself instead of a deep copy (a client that keeps one model per
        process and loads the global weights into it each round). Opacus is detached again
        before returning either way.
    optimizer_state : mapping, optional
        A previous :attr:`TrainResult.optimizer_state` to continue (a stateful client's
        momentum or Adam moments across rounds; :func:`load_optimizer_state`).
    gradient_correction : mapping of str to torch.Tensor, optional
        Added to each named trainable parameter's gradient before every optimizer step (after
        DP-SGD's clipping and noise): SCAFFOLD's ``c - c_k`` (:class:`GradientHook`). Keys
        must be exactly the trainable parameters' names, shapes must match.
    track_mean_gradient : bool
        Also return :attr:`TrainResult.mean_gradient`.
    logit_offset : torch.Tensor, optional
        Shape ``(num_labels,)``, added to the logits in the training loss only: the logit-adjusted
        loss with ``tau * log(prior)`` (:func:`logit_adjustment`). The returned model predicts with
        its plain logits. Under DP the offset must not depend on the private data (or be
        released privately first): it changes every example's gradient.

    Returns
    -------
    TrainResult

    Raises
    ------
    ValueError
        Empty dataset, DP batch size larger than the dataset (``q`` would exceed 1), a model
        without trainable parameters, or bf16 on a device without it.
    """
    if not isinstance(config, TrainConfig):
        raise ValueError(f"config must be a TrainConfig, got {type(config).__name__}")
    num_examples = len(cast(Sized, train_dataset))
    if num_examples == 0:
        raise ValueError("the training dataset is empty")
    if logit_offset is not None and (
        not isinstance(logit_offset, torch.Tensor) or logit_offset.dim() != 1 or not torch.isfinite(logit_offset).all()
    ):
        raise ValueError(f"logit_offset must be a finite 1-d tensor (one value per label), got {logit_offset!r}")
    if config.private and config.batch_size > num_examples:
        raise ValueError(
            f"batch_size {config.batch_size} exceeds the {num_examples} training examples: "
            "the Poisson sampling rate q = batch_size / N must be <= 1"
        )
    device = torch.device(device)
    autocast_context(device, config.precision)  # refuse bf16 on hardware without it, before any work
    data = as_packed(train_dataset, collator)
    sampling_rate = min(1.0, config.batch_size / num_examples)
    sample_seed, noise_seed, torch_seed = _seeds(config.seed, 3)
    if config.private and config.dp_randomness == "secret":
        sample_seed, noise_seed = _seeds(None, 2)  # unknown to anyone, the seed's owner included

    work = model if in_place else copy.deepcopy(model)
    work.to(device)
    work.train()
    params = [p for p in work.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters (build it with build_peft_model)")
    physical = resolve_physical_batch_size(config, work, data, device)
    optimizer = make_optimizer(params, config)
    if optimizer_state is not None:
        load_optimizer_state(optimizer, optimizer_state, config)
    gradient_hook = None
    if gradient_correction is not None or track_mean_gradient:
        named = {name: p for name, p in work.named_parameters() if p.requires_grad}  # get_trainable_state's names
        gradient_hook = GradientHook(optimizer, named, gradient_correction, device)
    scheduled = config.lr_schedule != "constant" or config.warmup_steps > 0
    offset = None if logit_offset is None else logit_offset.detach().to(device=device, dtype=torch.float32)
    sample_gen = torch.Generator().manual_seed(sample_seed)

    grad_sample_module: nn.Module | None = None
    dp_optimizer: Any = None
    if config.private:
        noise_gen = torch.Generator(device=device).manual_seed(noise_seed)
        grad_sample_module, dp_optimizer = attach_dp(
            work,
            optimizer,
            noise_multiplier=float(config.noise_multiplier),  # type: ignore[arg-type]
            max_grad_norm=config.max_grad_norm,
            expected_batch_size=config.batch_size,
            noise_generator=noise_gen,
        )
        batches = poisson_batches(num_examples, sampling_rate, sample_gen)
    else:
        batches = shuffled_batches(num_examples, config.batch_size, sample_gen)

    mode = (
        f"DP-SGD (q={sampling_rate:.4g}, sigma={config.noise_multiplier}, C={config.max_grad_norm}, "
        f"{config.dp_randomness} randomness)"
        if config.private
        else "non-private"
    )
    logger.debug(
        "training %d steps, %s, logical batch %d in micro-batches of <= %d, N=%d, %s lr=%g, %s",
        config.steps,
        mode,
        config.batch_size,
        physical,
        num_examples,
        config.optimizer,
        config.learning_rate,
        config.precision,
    )

    loss_sum, examples_seen, empty_batches, real_tokens, computed_tokens = 0.0, 0, 0, 0, 0
    memory_guard = MemoryGuard()
    start = time.perf_counter()
    rng_devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=rng_devices):
            torch.manual_seed(torch_seed)
            for step in range(1, config.steps + 1):
                if scheduled:
                    set_lr(optimizer, config.lr_at(step))
                micro = data.micro_batches(next(batches), physical)
                if grad_sample_module is not None:
                    step_loss, size = dp_logical_step(
                        grad_sample_module, dp_optimizer, micro, device, config.precision, offset
                    )
                else:
                    step_loss, size = plain_logical_step(work, optimizer, micro, device, config.precision, offset)
                if size == 0:
                    empty_batches += 1
                loss_sum += step_loss
                examples_seen += size
                real_tokens += sum(m.real_tokens for m in micro)
                computed_tokens += sum(m.computed_tokens for m in micro)
                del micro
                memory_guard()
                if progress is not None and (step % config.log_every == 0 or step == config.steps):
                    progress(
                        StepProgress(
                            step=step,
                            total_steps=config.steps,
                            batch_size=size,
                            loss=step_loss / size if size else None,
                            mean_loss=loss_sum / examples_seen if examples_seen else math.nan,
                            seconds=time.perf_counter() - start,
                            examples_seen=examples_seen,
                            real_tokens=real_tokens,
                            computed_tokens=computed_tokens,
                        )
                    )
    finally:
        if gradient_hook is not None:
            gradient_hook.remove()
        if grad_sample_module is not None:
            dp_optimizer.zero_grad(set_to_none=True)
            detach_dp(grad_sample_module)
            dp_optimizer = None
        optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - start
    state = get_trainable_state(work)
    saved_optimizer = _optimizer_state_to_cpu(optimizer.state_dict())
    saved_optimizer["fedtune_optimizer"] = config.optimizer
    del optimizer
    if not in_place:
        del work
    release_memory()
    if empty_batches:
        logger.debug("%d of %d Poisson batches were empty (noise-only steps)", empty_batches, config.steps)
    return TrainResult(
        state=state,
        steps=config.steps,
        sampling_rate=sampling_rate,
        noise_multiplier=None if config.noise_multiplier is None else float(config.noise_multiplier),
        max_grad_norm=config.max_grad_norm if config.private else None,
        num_examples=num_examples,
        examples_seen=examples_seen,
        mean_loss=loss_sum / examples_seen if examples_seen else math.nan,
        seconds=seconds,
        empty_batches=empty_batches,
        real_tokens=real_tokens,
        computed_tokens=computed_tokens,
        physical_batch_size=physical,
        precision=config.precision,
        optimizer_state=saved_optimizer,
        mean_gradient=gradient_hook.mean() if gradient_hook is not None and track_mean_gradient else None,
    )
