"""Local training: non-private, or DP-SGD built from Opacus components with exact accounting.

Used by a federated client for its local steps in each round, and by the centralized
baseline. :func:`train_local` never modifies the model it is given: it trains a deep copy
and returns the trained adapter and head weights (:func:`fedtune.model.get_trainable_state`).

DP mode (``TrainConfig.noise_multiplier`` set) is the sampled Gaussian mechanism the
accountants assume, step by step:

* **Poisson sampling** at exactly ``q = batch_size / N``: every example joins each batch
  independently with probability ``q`` (Opacus' ``UniformWithReplacementSampler``), so
  batch sizes vary and a batch can be empty. (Opacus' ``make_private`` would use
  ``1 / len(data_loader)``, which is not ``B / N`` unless ``B`` divides ``N``.)
* **Per-example clipping** to L2 norm ``C = max_grad_norm`` over *all* trainable
  parameters (LoRA A/B and head), from per-sample gradients of Opacus'
  ``GradSampleModule``.
* **Gaussian noise** of std ``noise_multiplier * C`` added to the sum of clipped gradients,
  which is then divided by the *expected* batch size ``B`` (``DPOptimizer``), never by the
  realised one.
* **Secret randomness**: by default the sampling and the noise come from fresh OS entropy,
  not from ``TrainConfig.seed`` (see ``TrainConfig.dp_randomness``).
* **Empty batches are steps**: the update is pure noise, the step is counted in
  ``TrainResult.steps`` and ``TrainResult.empty_batches``. Skipping them would change the
  mechanism the accountant is told about.

Each call attaches Opacus to a fresh copy of the model and removes every hook and
per-parameter attribute before returning, so nothing piles up across federated rounds.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fedtune.model import get_trainable_state

__all__ = [
    "EmptySafeCollator",
    "StepProgress",
    "TrainConfig",
    "TrainResult",
    "attach_dp",
    "batch_size_of",
    "detach_dp",
    "dp_step",
    "make_optimizer",
    "plain_step",
    "poisson_loader",
    "train_local",
]

logger = logging.getLogger(__name__)

OptimizerName = Literal["adamw", "sgd"]
_OPTIMIZERS: tuple[str, ...] = ("adamw", "sgd")
DPRandomness = Literal["secret", "seeded"]
_DP_RANDOMNESS: tuple[str, ...] = ("secret", "seeded")


def _check_int(name: str, value: Any, low: int, high: int | None = None) -> None:
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if not ok or value < low or (high is not None and value > high):
        bounds = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be an integer {bounds}, got {value!r}")


def _check_float(
    name: str, value: Any, low: float, *, low_inclusive: bool, high: float | None = None,
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
    optimizer : {"adamw", "sgd"}
        Default ``"adamw"``: LoRA ``A``/``B`` and the head have very different gradient
        scales, and under DP the clipped-and-noised gradient's scale depends on ``C`` and
        ``B``; Adam's per-coordinate normalization makes one learning rate work for all of
        them. Adam only post-processes the privatized gradient, so privacy is unaffected.
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
        Log (INFO) and call the progress callback every this many steps (>= 1).
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

    def __post_init__(self) -> None:
        _check_int("batch_size", self.batch_size, 1)
        _check_int("steps", self.steps, 1)
        _check_float("learning_rate", self.learning_rate, 0.0, low_inclusive=False)
        _check_float("max_grad_norm", self.max_grad_norm, 0.0, low_inclusive=False)
        if self.noise_multiplier is not None:
            _check_float("noise_multiplier", self.noise_multiplier, 0.0, low_inclusive=True)
        if self.optimizer not in _OPTIMIZERS:
            raise ValueError(
                f"optimizer must be one of {', '.join(_OPTIMIZERS)}, got {self.optimizer!r}"
            )
        _check_float("weight_decay", self.weight_decay, 0.0, low_inclusive=True)
        _check_float("momentum", self.momentum, 0.0, low_inclusive=True, high=1.0)
        if self.seed is not None:
            _check_int("seed", self.seed, 0, 2**63 - 1)
        if self.dp_randomness not in _DP_RANDOMNESS:
            raise ValueError(
                f"dp_randomness must be one of {', '.join(_DP_RANDOMNESS)}, got {self.dp_randomness!r}"
            )
        _check_int("log_every", self.log_every, 1)

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


@dataclass(frozen=True)
class StepProgress:
    """Progress report passed to the ``progress`` callback of :func:`train_local`."""

    step: int
    total_steps: int
    batch_size: int
    loss: float | None
    mean_loss: float
    seconds: float


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
            c: torch.zeros((0,) if c in ("labels", "label_ids") else (0, 0), dtype=torch.long)
            for c in self.columns
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
        num_samples=len(dataset), sample_rate=sample_rate, generator=generator
    )
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=EmptySafeCollator(collator, _columns(dataset)),
    )


def make_optimizer(params: Sequence[nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    """The (non-private) optimizer named by ``config.optimizer``."""
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    return torch.optim.SGD(
        params, lr=config.learning_rate, momentum=config.momentum, weight_decay=config.weight_decay
    )


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
    inner = grad_sample_module._module
    grad_sample_module._close()
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


def _loss(model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
    loss = model(**batch).loss
    if loss is None:
        raise ValueError(f"the model returned no loss: batches need a 'labels' column (got {list(batch)})")
    return loss


def plain_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, batch: Mapping[str, Any], device: torch.device
) -> float:
    """One non-private step: mean loss over the batch, backward, optimizer step."""
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
    """One DP-SGD step on a (possibly empty) Poisson batch.

    An empty batch skips the forward pass but still steps: every trainable parameter gets
    a zero-row per-sample gradient, so the update is the noise alone (divided by ``B``).
    After the call ``p.grad`` holds the privatized gradient and ``p.summed_grad`` the sum
    of clipped per-sample gradients, until the next step.

    Returns
    -------
    float or None
        The batch's mean loss, or ``None`` for an empty batch.
    """
    dp_optimizer.zero_grad(set_to_none=True)
    if batch_size_of(batch) == 0:
        for param in dp_optimizer.params:
            param.grad_sample = torch.zeros((0, *param.shape), dtype=param.dtype, device=param.device)
        dp_optimizer.step()
        return None
    loss = _loss(grad_sample_module, _to_device(batch, device))
    with warnings.catch_warnings():
        # Opacus' full backward hooks on layers whose inputs need no grad (frozen embeddings
        # below the first adapter): expected and harmless.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        loss.backward()
    dp_optimizer.step()
    return float(loss.detach())


def _seeds(seed: int | None, count: int) -> list[int]:
    entropy = seed if seed is not None else int.from_bytes(os.urandom(8), "little")
    return [int(s) for s in np.random.SeedSequence(entropy).generate_state(count, dtype=np.uint64) >> 1]


def _cycle(loader: DataLoader) -> Iterator[Any]:
    while True:
        yield from loader


def train_local(
    model: nn.Module,
    train_dataset: Dataset,
    collator: Callable[[list[Any]], Any],
    config: TrainConfig,
    device: torch.device | str = "cpu",
    *,
    progress: ProgressCallback | None = None,
) -> TrainResult:
    """Train a copy of ``model`` for ``config.steps`` steps; return its trainable state.

    Parameters
    ----------
    model : torch.nn.Module
        A peft model (:func:`fedtune.model.build_peft_model`); left unchanged.
    train_dataset : torch.utils.data.Dataset
        Tokenized examples (dicts with ``input_ids``, ``attention_mask``, ``labels``, ...),
        e.g. from :func:`fedtune.data.tokenize.tokenize_dataset`.
    collator : callable
        Pads a list of examples into a batch, e.g. ``DataCollatorWithPadding``.
    config : TrainConfig
        Steps, batch size, learning rate and, for DP-SGD, ``noise_multiplier`` and
        ``max_grad_norm``.
    device : torch.device or str
        Where to train.
    progress : callable, optional
        Called with a :class:`StepProgress` every ``config.log_every`` steps and at the end.

    Returns
    -------
    TrainResult

    Raises
    ------
    ValueError
        Empty dataset, DP batch size larger than the dataset (``q`` would exceed 1), or a
        model without trainable parameters.
    """
    if not isinstance(config, TrainConfig):
        raise ValueError(f"config must be a TrainConfig, got {type(config).__name__}")
    num_examples = len(train_dataset)
    if num_examples == 0:
        raise ValueError("the training dataset is empty")
    if config.private and config.batch_size > num_examples:
        raise ValueError(
            f"batch_size {config.batch_size} exceeds the {num_examples} training examples: "
            "the Poisson sampling rate q = batch_size / N must be <= 1"
        )
    device = torch.device(device)
    sampling_rate = min(1.0, config.batch_size / num_examples)
    sample_seed, noise_seed, torch_seed = _seeds(config.seed, 3)
    if config.private and config.dp_randomness == "secret":
        sample_seed, noise_seed = _seeds(None, 2)  # unknown to anyone, the seed's owner included

    work = copy.deepcopy(model).to(device)
    work.train()
    params = [p for p in work.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters (build it with build_peft_model)")
    optimizer = make_optimizer(params, config)
    sample_gen = torch.Generator().manual_seed(sample_seed)

    grad_sample_module: nn.Module | None = None
    dp_optimizer: Any = None
    if config.private:
        noise_gen = torch.Generator(device=device).manual_seed(noise_seed)
        grad_sample_module, dp_optimizer = attach_dp(
            work,
            optimizer,
            noise_multiplier=float(config.noise_multiplier),
            max_grad_norm=config.max_grad_norm,
            expected_batch_size=config.batch_size,
            noise_generator=noise_gen,
        )
        loader = poisson_loader(train_dataset, collator, sampling_rate, sample_gen)
    else:
        loader = DataLoader(
            train_dataset,
            batch_size=config.batch_size,
            shuffle=True,
            generator=sample_gen,
            collate_fn=collator,
        )

    mode = (
        f"DP-SGD (q={sampling_rate:.4g}, sigma={config.noise_multiplier}, C={config.max_grad_norm}, "
        f"{config.dp_randomness} randomness)"
        if config.private
        else "non-private"
    )
    logger.info(
        "training %d steps, %s, batch %d, N=%d, %s lr=%g",
        config.steps, mode, config.batch_size, num_examples, config.optimizer, config.learning_rate,
    )

    loss_sum, examples_seen, empty_batches = 0.0, 0, 0
    start = time.perf_counter()
    rng_devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=rng_devices):
            torch.manual_seed(torch_seed)
            batches = _cycle(loader)
            for step in range(1, config.steps + 1):
                batch = next(batches)
                size = batch_size_of(batch)
                if grad_sample_module is not None:
                    loss = dp_step(grad_sample_module, dp_optimizer, batch, device)
                else:
                    loss = plain_step(work, optimizer, batch, device)
                if loss is None:
                    empty_batches += 1
                else:
                    loss_sum += loss * size
                    examples_seen += size
                if step % config.log_every == 0 or step == config.steps:
                    report = StepProgress(
                        step=step,
                        total_steps=config.steps,
                        batch_size=size,
                        loss=loss,
                        mean_loss=loss_sum / examples_seen if examples_seen else math.nan,
                        seconds=time.perf_counter() - start,
                    )
                    logger.info(
                        "step %d/%d: batch %d, loss %s, mean loss %.4f, %.1fs",
                        step, config.steps, size,
                        "n/a (empty batch)" if loss is None else f"{loss:.4f}",
                        report.mean_loss, report.seconds,
                    )
                    if progress is not None:
                        progress(report)
    finally:
        if grad_sample_module is not None:
            detach_dp(grad_sample_module)
            dp_optimizer = None
    seconds = time.perf_counter() - start
    state = get_trainable_state(work)
    del work, optimizer
    if empty_batches:
        logger.info("%d of %d Poisson batches were empty (noise-only steps)", empty_batches, config.steps)
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
    )
