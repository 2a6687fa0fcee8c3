"""What one machine of a deployment builds for itself, without the whole federation's data.

In a simulation one process holds every shard (:class:`fedtune.workload.Workload`). In a deployment
each machine holds only its own data: a client its shard, the server the evaluation split. Both
build the same model as the simulation's template (same settings, same seed), so the adapter and
head weights they exchange have the same keys and shapes.
"""

from __future__ import annotations

import math
from typing import Any

from fedtune.config import RunConfig

__all__ = ["build_template", "local_plan"]


def build_template(config: RunConfig, num_labels: int) -> tuple[Any, Any]:
    """The peft model (adapter and head at their seeded initial values) and its tokenizer."""
    from fedtune.model import LoraSettings, build_peft_model, load_model_and_tokenizer

    base, tokenizer = load_model_and_tokenizer(config.model, num_labels, seed=config.seed)
    targets = tuple(t.strip() for t in config.lora_targets.split(",") if t.strip()) or None
    lora = LoraSettings(rank=config.lora_rank, alpha=config.lora_alpha, dropout=config.lora_dropout, target_modules=targets)
    return build_peft_model(base, lora, seed=config.seed), tokenizer


def local_plan(config: RunConfig, examples: int) -> tuple[float, int]:
    """Poisson rate ``q = min(1, B / N)`` and optimizer steps per round for a shard of ``examples``.

    A shard smaller than the batch size trains on all of its examples at every step (``q = 1``: no
    amplification by subsampling; the accountants handle it exactly). Steps per round are
    ``ceil(local_epochs * N / B)`` unless ``local_steps`` is set. Used by the simulated clients
    (:class:`fedtune.workload.Workload`) and the deployed ones alike.
    """
    steps = config.local_steps if config.local_steps is not None else max(1, math.ceil(config.local_epochs * examples / config.batch_size))
    return min(1.0, config.batch_size / examples), steps
