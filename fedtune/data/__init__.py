"""GLUE data loading, partitioning, tokenization and metrics.

Modules
-------
glue
    :class:`TaskSpec`, :data:`TASKS`, :func:`load_glue` (hub, local parquet or TSV).
partition
    :func:`partition_dataset` (IID / Dirichlet through flwr-datasets),
    :func:`parse_partition_spec`, :func:`describe_partitions`, :func:`label_skew`.
tokenize
    :func:`tokenize_dataset`, :func:`make_collator` (imported lazily: pulls in transformers).
metrics
    :func:`compute_metrics`, :func:`main_metric`, :func:`majority_class_rate`.
"""

from __future__ import annotations

from typing import Any

from fedtune.data.glue import (
    DATA_DIR_ENV,
    TASKS,
    DataNotFoundError,
    GlueData,
    TaskSpec,
    get_task_spec,
    load_glue,
)
from fedtune.data.metrics import compute_metrics, main_metric, majority_class_rate
from fedtune.data.partition import (
    PartitionSpec,
    describe_partitions,
    label_skew,
    parse_partition_spec,
    partition_dataset,
)

__all__ = [
    "DATA_DIR_ENV",
    "TASKS",
    "DataNotFoundError",
    "GlueData",
    "PartitionSpec",
    "TaskSpec",
    "compute_metrics",
    "describe_partitions",
    "get_task_spec",
    "label_skew",
    "load_glue",
    "main_metric",
    "majority_class_rate",
    "make_collator",
    "parse_partition_spec",
    "partition_dataset",
    "tokenize_dataset",
]

_LAZY = {"make_collator", "tokenize_dataset"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from fedtune.data import tokenize

        return getattr(tokenize, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
