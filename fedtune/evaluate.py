"""Evaluate a sequence-classification model: mean loss and the task's metrics."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sized
from typing import Any, cast

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

__all__ = ["evaluate"]

logger = logging.getLogger(__name__)


def _task_metrics(task: str, logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """The task's metrics from :mod:`fedtune.data.metrics`, or accuracy if unavailable."""
    try:
        from fedtune.data.metrics import compute_metrics
    except ImportError:  # the data package is optional for this module
        logger.debug("fedtune.data.metrics unavailable; reporting accuracy only")
        return {"accuracy": float((logits.argmax(axis=1) == labels).mean())}
    return dict(compute_metrics(task, logits, labels))


def evaluate(
    model: nn.Module,
    eval_dataset: Dataset,
    collator: Callable[[list[Any]], Any],
    task: str,
    device: torch.device | str = "cpu",
    batch_size: int = 64,
) -> dict[str, float]:
    """Compute the mean cross-entropy loss and the task metrics on a labelled dataset.

    The model is moved to ``device`` and put in eval mode for the pass; its previous
    train/eval mode is restored afterwards.

    Parameters
    ----------
    model : torch.nn.Module
        A classification model returning ``.logits`` (a peft model or a plain one).
    eval_dataset : torch.utils.data.Dataset
        Tokenized examples with ``labels``.
    collator : callable
        Pads a list of examples into a batch.
    task : str
        GLUE task name, for :func:`fedtune.data.metrics.compute_metrics`.
    device : torch.device or str
        Where to run.
    batch_size : int
        Evaluation batch size (>= 1).

    Returns
    -------
    dict of str to float
        ``loss`` (example-weighted mean cross-entropy), ``num_examples``, and the task's
        metrics (``accuracy``; ``f1`` or ``matthews_correlation`` where the task defines them).

    Raises
    ------
    ValueError
        Empty dataset, bad ``batch_size``, or batches without labels.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if len(cast(Sized, eval_dataset)) == 0:
        raise ValueError("the evaluation dataset is empty")
    device = torch.device(device)
    was_training = model.training
    model.to(device)
    model.eval()
    loader = DataLoader(eval_dataset, batch_size=batch_size, shuffle=False, collate_fn=collator)
    all_logits: list[torch.Tensor] = []
    all_labels: list[torch.Tensor] = []
    loss_sum = 0.0
    try:
        with torch.inference_mode():
            for batch in loader:
                if "labels" not in batch:
                    raise ValueError(f"evaluation batches need a 'labels' column (got {list(batch)})")
                labels = batch["labels"]
                inputs = {
                    k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items() if k != "labels"
                }
                logits = model(**inputs).logits.float().cpu()
                loss_sum += float(nn.functional.cross_entropy(logits, labels.long(), reduction="sum"))
                all_logits.append(logits)
                all_labels.append(labels.cpu())
    finally:
        model.train(was_training)
    logits_np = torch.cat(all_logits).numpy()
    labels_np = torch.cat(all_labels).numpy()
    n = len(labels_np)
    result: dict[str, float] = {"loss": loss_sum / n, "num_examples": n}
    result.update(_task_metrics(task, logits_np, labels_np))
    logger.info("eval %s on %d examples: %s", task, n, {k: round(v, 4) for k, v in result.items()})
    return result
