"""GLUE evaluation metrics (scikit-learn implementations).

Every task reports ``accuracy``; MRPC and QQP add ``f1`` (binary F1 of class 1,
"equivalent"/"duplicate"); CoLA adds ``matthews_correlation``, its main metric.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from fedtune.data.glue import TaskSpec, get_task_spec

__all__ = ["compute_metrics", "main_metric", "majority_class_rate"]


def _as_predictions(predictions: ArrayLike, num_labels: int) -> np.ndarray:
    preds = np.asarray(predictions)
    if preds.ndim == 2:  # logits or probabilities, one row per example
        if preds.shape[1] != num_labels:
            raise ValueError(f"predictions have {preds.shape[1]} columns, expected {num_labels} (one per class)")
        return preds.argmax(axis=1)
    if preds.ndim != 1:
        raise ValueError(f"predictions must be 1-D class ids or 2-D logits, got shape {preds.shape}")
    return preds


def compute_metrics(task_or_spec: str | TaskSpec, predictions: ArrayLike, labels: ArrayLike) -> dict[str, float]:
    """Compute the task's metrics.

    Parameters
    ----------
    task_or_spec : str or TaskSpec
        The GLUE task.
    predictions : array-like
        Predicted class ids, shape ``(n,)``, or logits, shape ``(n, num_labels)``.
    labels : array-like
        True class ids, shape ``(n,)``.

    Returns
    -------
    dict of str to float
        The metrics named in ``spec.metric_names``.

    Raises
    ------
    ValueError
        Empty input, length mismatch, or ids outside ``0..num_labels-1``.
    """
    spec = get_task_spec(task_or_spec)
    preds = _as_predictions(predictions, spec.num_labels)
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {y.shape}")
    if len(preds) != len(y):
        raise ValueError(f"{len(preds)} predictions but {len(y)} labels")
    if len(y) == 0:
        raise ValueError("cannot compute metrics on zero examples")
    for name, arr in (("predictions", preds), ("labels", y)):
        bad = sorted({int(v) for v in np.unique(arr)} - set(range(spec.num_labels)))
        if bad:
            raise ValueError(f"{name} contain class ids {bad} outside 0..{spec.num_labels - 1}")
    out: dict[str, float] = {}
    for metric in spec.metric_names:
        if metric == "accuracy":
            out[metric] = float(accuracy_score(y, preds))
        elif metric == "f1":
            out[metric] = float(f1_score(y, preds, pos_label=1, average="binary", zero_division=0))
        elif metric == "matthews_correlation":
            out[metric] = float(matthews_corrcoef(y, preds))
        else:  # pragma: no cover - guarded by TaskSpec definitions
            raise ValueError(f"unknown metric {metric!r}")
    return out


def main_metric(task_or_spec: str | TaskSpec) -> str:
    """Name of the metric used to rank runs (``matthews_correlation`` for CoLA, else ``accuracy``)."""
    return get_task_spec(task_or_spec).main_metric


def majority_class_rate(labels: ArrayLike | Sequence[int]) -> float:
    """Share of the most frequent label: the accuracy of always predicting it.

    Raises
    ------
    ValueError
        If ``labels`` is empty.
    """
    y = np.asarray(labels)
    if y.size == 0:
        raise ValueError("majority_class_rate needs at least one label")
    _, counts = np.unique(y, return_counts=True)
    return float(counts.max() / y.size)
