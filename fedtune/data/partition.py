"""Split a training set across federated clients with flwr-datasets partitioners.

``iid``
    The dataset is shuffled with ``seed`` and cut into ``num_clients`` contiguous shards
    (:class:`flwr_datasets.partitioner.IidPartitioner`); sizes differ by at most one.
``dirichlet``
    Label-skewed split (:class:`flwr_datasets.partitioner.DirichletPartitioner`): each
    label's examples are divided by proportions drawn from Dirichlet(``alpha``). Small
    ``alpha`` (0.1) gives strongly skewed clients, large ``alpha`` (100) nearly IID ones.
    The partitioner resamples (reproducibly) until every client has at least
    ``min_partition_size`` examples and gives up after 10 retries.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Literal

import datasets
import numpy as np
from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, Partitioner

from fedtune.data.glue import label_array

__all__ = [
    "DEFAULT_ALPHA",
    "SCHEMES",
    "PartitionSpec",
    "describe_partitions",
    "label_skew",
    "parse_partition_spec",
    "partition_dataset",
]

Scheme = Literal["iid", "dirichlet"]
SCHEMES: tuple[str, ...] = ("iid", "dirichlet")
DEFAULT_ALPHA = 0.5
_ROW = "__row__"


def _check_alpha(alpha: Any) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise ValueError(f"Dirichlet alpha must be a positive number, got {alpha!r}")
    if not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"Dirichlet alpha must be a finite number > 0, got {alpha!r}")
    return float(alpha)


@dataclass(frozen=True)
class PartitionSpec:
    """How to split data across clients.

    Parameters
    ----------
    scheme : {"iid", "dirichlet"}
        Partitioning scheme.
    alpha : float or None
        Dirichlet concentration (``None`` for ``iid``).
    """

    scheme: Scheme
    alpha: float | None = None

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ValueError(f"unknown partition scheme {self.scheme!r}; expected one of {SCHEMES}")
        if self.scheme == "iid" and self.alpha is not None:
            raise ValueError(f"the iid scheme takes no alpha, got alpha={self.alpha!r}")
        if self.scheme == "dirichlet":
            object.__setattr__(self, "alpha", _check_alpha(self.alpha))

    def __str__(self) -> str:
        return self.scheme if self.alpha is None else f"{self.scheme}:{self.alpha:g}"


def parse_partition_spec(text: str) -> PartitionSpec:
    """Parse ``"iid"``, ``"dirichlet"`` (alpha 0.5) or ``"dirichlet:<alpha>"``.

    Raises
    ------
    ValueError
        Unknown scheme, a parameter on ``iid``, or an alpha that is not a finite number > 0.
    """
    scheme, sep, param = str(text).strip().lower().partition(":")
    scheme, param = scheme.strip(), param.strip()
    if scheme not in SCHEMES:
        raise ValueError(f"unknown partition scheme {text!r}; expected 'iid', 'dirichlet' or 'dirichlet:<alpha>'")
    if scheme == "iid":
        if sep:
            raise ValueError(f"the iid scheme takes no parameter, got {text!r}")
        return PartitionSpec("iid")
    if not sep:
        return PartitionSpec("dirichlet", DEFAULT_ALPHA)
    try:
        alpha = float(param)
    except ValueError:
        raise ValueError(f"bad Dirichlet alpha in {text!r}: {param!r} is not a number") from None
    return PartitionSpec("dirichlet", alpha)


def _proxy(columns: dict[str, np.ndarray]) -> datasets.Dataset:
    # Arrow format: the partitioners read whole columns, which is slow row by row.
    return datasets.Dataset.from_dict(columns).with_format("arrow")


def _rows(proxy: datasets.Dataset) -> np.ndarray:
    return np.asarray(proxy.with_format("arrow")[_ROW], dtype=np.int64)


def _check_request(n: int, num_clients: Any, min_size: int) -> int:
    if isinstance(num_clients, bool) or not isinstance(num_clients, (int, np.integer)):
        raise ValueError(f"num_clients must be an integer, got {num_clients!r}")
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if num_clients > n:
        raise ValueError(
            f"cannot split {n} examples across {num_clients} clients: "
            "more clients than examples would leave some client empty"
        )
    if num_clients * min_size > n:
        raise ValueError(f"cannot give {num_clients} clients at least {min_size} examples each from {n} examples")
    return int(num_clients)


def partition_dataset(
    dataset: datasets.Dataset,
    num_clients: int,
    scheme: str = "iid",
    alpha: float | None = DEFAULT_ALPHA,
    seed: int = 0,
    *,
    min_partition_size: int = 1,
    self_balancing: bool = True,
) -> list[datasets.Dataset]:
    """Split ``dataset`` into ``num_clients`` disjoint, non-empty partitions.

    Parameters
    ----------
    dataset : datasets.Dataset
        Training set; ``dirichlet`` needs an integer ``label`` column.
    num_clients : int
        Number of partitions.
    scheme : {"iid", "dirichlet"}
        Partitioning scheme (see the module docstring).
    alpha : float, optional
        Dirichlet concentration; ignored for ``iid``; ``None`` means 0.5.
    seed : int
        Seed for shuffling and Dirichlet sampling; equal seeds give equal partitions.
    min_partition_size : int
        ``dirichlet`` only: every client gets at least this many examples.
    self_balancing : bool
        ``dirichlet`` only: stop giving examples to a client once it holds more than
        the average share (the usual NIID-Bench/FedMA behaviour).

    Returns
    -------
    list of datasets.Dataset
        One dataset per client, in client order. Together they hold every example
        exactly once.

    Raises
    ------
    ValueError
        Unknown scheme, bad alpha, more clients than examples, or a partition that
        would leave a client below ``min_partition_size``.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown partition scheme {scheme!r}; expected one of {SCHEMES}")
    if isinstance(min_partition_size, bool) or not isinstance(min_partition_size, int) or min_partition_size < 1:
        raise ValueError(f"min_partition_size must be an integer >= 1, got {min_partition_size!r}")
    n = len(dataset)
    k = _check_request(n, num_clients, min_partition_size if scheme == "dirichlet" else 1)

    # The partitioner works on a light proxy (row numbers and labels); the real rows are
    # then selected once per client. Same assignment, no copies of the text columns.
    rows = np.arange(n, dtype=np.int64)
    partitioner: Partitioner
    if scheme == "iid":
        partitioner = IidPartitioner(num_partitions=k)
        partitioner.dataset = _proxy({_ROW: rows}).shuffle(seed=seed)
    else:
        if "label" not in dataset.column_names:
            raise ValueError(f"dirichlet partitioning needs a 'label' column, got {dataset.column_names}")
        a = _check_alpha(DEFAULT_ALPHA if alpha is None else alpha)
        partitioner = DirichletPartitioner(
            num_partitions=k,
            partition_by="label",
            alpha=a,
            min_partition_size=min_partition_size,
            self_balancing=self_balancing,
            shuffle=True,
            seed=seed,
        )
        partitioner.dataset = _proxy({_ROW: rows, "label": label_array(dataset)})
    try:
        with warnings.catch_warnings():
            # The partitioner warns on every (seeded, reproducible) resampling round.
            warnings.filterwarnings("ignore", message="The specified min_partition_size")
            assignment = [_rows(partitioner.load_partition(i)) for i in range(k)]
    except ValueError as exc:
        raise ValueError(
            f"{scheme} partitioning of {n} examples across {k} clients (alpha={alpha}, "
            f"seed={seed}) left some client with fewer than {min_partition_size} examples "
            f"after 10 resampling rounds; use a larger alpha, fewer clients or a smaller minimum shard size ({exc})"
        ) from exc
    parts = [dataset.select(idx) for idx in assignment]
    sizes = [len(p) for p in parts]
    if min(sizes) < 1 or sum(sizes) != n:
        raise ValueError(f"{scheme} partitioning gave client sizes {sizes} for {n} examples")
    return parts


def _label_counts(parts: list[datasets.Dataset]) -> tuple[np.ndarray, int]:
    labels = [label_array(p) for p in parts]
    n_cls = max((int(a.max()) + 1 for a in labels if a.size), default=0)
    feat = parts[0].features.get("label") if parts else None
    if isinstance(feat, datasets.ClassLabel):
        n_cls = max(n_cls, feat.num_classes)
    counts = np.stack([np.bincount(a, minlength=n_cls) for a in labels]) if parts else np.zeros((0, 0))
    return counts, n_cls


def describe_partitions(parts: list[datasets.Dataset]) -> list[dict[str, Any]]:
    """Summarise partitions for reports.

    Returns
    -------
    list of dict
        Per client: ``client`` (index), ``examples`` (count) and ``label_counts``
        (``{label: count}`` for every label of the task, zeros included).
    """
    counts, n_cls = _label_counts(parts)
    return [
        {
            "client": i,
            "examples": len(p),
            "label_counts": {lab: int(counts[i, lab]) for lab in range(n_cls)},
        }
        for i, p in enumerate(parts)
    ]


def label_skew(parts: list[datasets.Dataset]) -> float:
    """Mean total-variation distance between each client's label mix and the pooled one.

    0 means every client has exactly the global label distribution; values near
    ``1 - 1/num_labels`` mean clients hold (almost) a single label each.
    """
    counts, _ = _label_counts(parts)
    counts = counts[counts.sum(axis=1) > 0] if counts.size else counts
    if counts.size == 0:
        raise ValueError("label_skew needs at least one non-empty partition")
    pooled = counts.sum(axis=0) / counts.sum()
    local = counts / counts.sum(axis=1, keepdims=True)
    return float(np.mean(0.5 * np.abs(local - pooled).sum(axis=1)))
