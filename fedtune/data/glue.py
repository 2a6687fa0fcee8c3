"""GLUE task specifications and the :func:`load_glue` entry point.

Data comes from one of three places, tried in this order:

1. the ``data_dir`` argument,
2. the ``FEDTUNE_DATA_DIR`` environment variable,
3. the Hugging Face hub (``datasets.load_dataset("nyu-mll/glue", task)``).

A local directory may be the GLUE root (holding one folder per task) or one task's
folder. Inside a task folder the Hugging Face parquet files
(``hf_parquet/<split>-*.parquet``) are preferred over the GLUE TSV files. Tasks whose
local copy has no train split (QNLI, QQP and MNLI in the offline copy) get a seeded
stratified split of their validation set; :attr:`GlueData.notes` says so, and every
report built on the data must show those notes.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, cast

import datasets
import numpy as np
from sklearn.model_selection import train_test_split

from fedtune.data.local import DataNotFoundError, Format, load_local_splits, resolve_task_dir

__all__ = [
    "DATA_DIR_ENV",
    "HUB_DATASET",
    "TASKS",
    "DataNotFoundError",
    "GlueData",
    "TaskSpec",
    "get_task_spec",
    "label_array",
    "load_glue",
]

DATA_DIR_ENV = "FEDTUNE_DATA_DIR"
HUB_DATASET = "nyu-mll/glue"

Source = Literal["auto", "hub", "local-parquet", "local-tsv"]


@dataclass(frozen=True)
class TaskSpec:
    """Static description of one GLUE task.

    Parameters
    ----------
    name : str
        Lower-case task name as used on the hub (``"sst2"``, ``"mnli"``, ...).
    display_name : str
        Official GLUE spelling, also the folder name in the ``glue_data/`` layout.
    text_columns : tuple of str
        One (single sentence) or two (sentence pair) text column names.
    label_names : tuple of str
        Class names, indexed by the integer label used in the HF parquet files.
    eval_split : str
        Name of the labelled split used for evaluation.
    metric_names : tuple of str
        Metrics reported for the task (see :mod:`fedtune.data.metrics`).
    main_metric : str
        The metric used to rank runs; one of ``metric_names``.
    train_split : str
        Name of the training split.
    """

    name: str
    display_name: str
    text_columns: tuple[str, ...]
    label_names: tuple[str, ...]
    eval_split: str = "validation"
    metric_names: tuple[str, ...] = ("accuracy",)
    main_metric: str = "accuracy"
    train_split: str = "train"

    def __post_init__(self) -> None:
        if len(self.text_columns) not in (1, 2):
            raise ValueError(f"{self.name}: expected 1 or 2 text columns, got {self.text_columns}")
        if len(self.label_names) < 2:
            raise ValueError(f"{self.name}: expected at least 2 labels, got {self.label_names}")
        if self.main_metric not in self.metric_names:
            raise ValueError(f"{self.name}: main metric {self.main_metric!r} not in {self.metric_names}")

    @property
    def num_labels(self) -> int:
        """Number of classes."""
        return len(self.label_names)

    @property
    def is_pair(self) -> bool:
        """Whether the task classifies sentence pairs."""
        return len(self.text_columns) == 2

    def features(self) -> datasets.Features:
        """Return the canonical features: the text columns and a ``ClassLabel`` label."""
        cols: dict[str, datasets.Value | datasets.ClassLabel] = {c: datasets.Value("string") for c in self.text_columns}
        cols["label"] = datasets.ClassLabel(names=list(self.label_names))
        return datasets.Features(cols)


_BINARY_F1 = ("accuracy", "f1")

TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec("sst2", "SST-2", ("sentence",), ("negative", "positive")),
        TaskSpec("qnli", "QNLI", ("question", "sentence"), ("entailment", "not_entailment")),
        TaskSpec("qqp", "QQP", ("question1", "question2"), ("not_duplicate", "duplicate"), metric_names=_BINARY_F1),
        TaskSpec(
            "mnli",
            "MNLI",
            ("premise", "hypothesis"),
            ("entailment", "neutral", "contradiction"),
            eval_split="validation_matched",
        ),
        TaskSpec("rte", "RTE", ("sentence1", "sentence2"), ("entailment", "not_entailment")),
        TaskSpec("mrpc", "MRPC", ("sentence1", "sentence2"), ("not_equivalent", "equivalent"), metric_names=_BINARY_F1),
        TaskSpec(
            "cola",
            "CoLA",
            ("sentence",),
            ("unacceptable", "acceptable"),
            metric_names=("accuracy", "matthews_correlation"),
            main_metric="matthews_correlation",
        ),
    )
}
"""All supported tasks, keyed by lower-case name."""


def get_task_spec(task: str | TaskSpec) -> TaskSpec:
    """Return the :class:`TaskSpec` for a task name (case-insensitive) or pass a spec through.

    Raises
    ------
    ValueError
        If the task is unknown; the message names it and lists the allowed tasks.
    """
    if isinstance(task, TaskSpec):
        return task
    key = str(task).strip().lower().replace("-", "")
    if key not in TASKS:
        raise ValueError(f"unknown GLUE task {task!r}; expected one of: {', '.join(TASKS)}")
    return TASKS[key]


@dataclass(frozen=True)
class GlueData:
    """A loaded GLUE task.

    Attributes
    ----------
    spec : TaskSpec
        The task.
    train, eval : datasets.Dataset
        Columns: ``spec.text_columns`` and ``label`` (``ClassLabel``, ints).
    source : str
        ``"hub"``, ``"local-parquet"`` or ``"local-tsv"``.
    notes : list of str
        Human-readable caveats (dev-set splits, subsampling) that every output must show.
    data_dir : pathlib.Path or None
        The task folder the data was read from (``None`` for the hub).
    """

    spec: TaskSpec
    train: datasets.Dataset
    eval: datasets.Dataset
    source: str
    notes: list[str] = field(default_factory=list)
    data_dir: Path | None = None

    def summary(self) -> str:
        """One line per fact: task, source, sizes, then the notes."""
        where = f" ({self.data_dir})" if self.data_dir else ""
        lines = [
            f"task {self.spec.name}: source {self.source}{where}, "
            f"train {len(self.train):,} / eval {len(self.eval):,} examples",
        ]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def label_array(ds: datasets.Dataset) -> np.ndarray:
    """Return the ``label`` column of ``ds`` as a NumPy integer array (fast, via Arrow)."""
    return np.asarray(ds.with_format("arrow")["label"], dtype=np.int64)


def _check_fraction(value: float) -> float:
    if not isinstance(value, (int, float)) or not 0.0 < float(value) < 1.0:
        raise ValueError(f"dev_split_fraction must be strictly between 0 and 1, got {value!r}")
    return float(value)


def _check_limit(name: str, value: int | None) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
    return int(value)


def _split_dev(dev: datasets.Dataset, fraction: float, seed: int) -> tuple[datasets.Dataset, datasets.Dataset, str]:
    """Split a labelled dev set into (train, eval), stratified by label when possible."""
    n = len(dev)
    n_eval = math.ceil(fraction * n)
    if n_eval >= n:
        raise ValueError(f"cannot split {n} dev examples with dev_split_fraction={fraction}")
    idx = np.arange(n)
    labels = label_array(dev)
    kind = "stratified"
    try:
        tr, ev = train_test_split(idx, test_size=n_eval, random_state=seed, stratify=labels)
    except ValueError:  # a class with fewer than 2 members, or eval too small for all classes
        tr, ev = train_test_split(idx, test_size=n_eval, random_state=seed, shuffle=True)
        kind = "plain (too few examples per class to stratify)"
    return dev.select(np.sort(tr)), dev.select(np.sort(ev)), kind


def _subsample(ds: datasets.Dataset, limit: int | None, seed: int, stream: int) -> datasets.Dataset:
    """Seeded random subsample of at most ``limit`` rows, kept in their original order."""
    if limit is None or limit >= len(ds):
        return ds
    rng = np.random.default_rng([seed, stream])
    return ds.select(np.sort(rng.choice(len(ds), size=limit, replace=False)))


def _canonical(ds: datasets.Dataset, spec: TaskSpec, where: str) -> datasets.Dataset:
    """Keep only the text columns and ``label``, cast to the canonical features."""
    missing = [c for c in (*spec.text_columns, "label") if c not in ds.column_names]
    if missing:
        raise DataNotFoundError(f"{where}: columns {missing} missing for task {spec.name!r} (has {ds.column_names})")
    ds = ds.select_columns([*spec.text_columns, "label"])
    return ds.cast(spec.features())


def _load_hub(spec: TaskSpec) -> tuple[datasets.Dataset, datasets.Dataset]:
    from fedtune.io import hub_reachable

    offline = any(
        os.environ.get(k, "").strip().lower() in {"1", "true", "yes", "on"}
        for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )
    if not offline and not hub_reachable():  # offline mode reads the local cache without retries
        raise DataNotFoundError(
            f"no local GLUE data for task {spec.name!r} and the Hugging Face hub cannot be reached (offline?): "
            f"pass --data-dir (data_dir=...) or set {DATA_DIR_ENV} to a local GLUE copy"
        )
    try:
        dd = datasets.load_dataset(HUB_DATASET, spec.name)
    except Exception as exc:  # noqa: BLE001 - every failure here means "no hub data"
        raise DataNotFoundError(
            f"could not load GLUE task {spec.name!r} from the Hugging Face hub "
            f"({HUB_DATASET}): {type(exc).__name__}: {exc}. Pass --data-dir "
            f"(data_dir=...) or set {DATA_DIR_ENV} to a local GLUE copy."
        ) from exc
    where = f"hub {HUB_DATASET}/{spec.name}"
    return (
        _canonical(dd[spec.train_split], spec, where),
        _canonical(dd[spec.eval_split], spec, where),
    )


def _resolve_root(data_dir: str | os.PathLike[str] | None, source: str) -> Path | None:
    """The local folder to read (argument, then environment), or ``None`` for the hub."""
    if source == "hub":
        if data_dir is not None:
            raise ValueError(f"source='hub' conflicts with data_dir={str(data_dir)!r}")
        return None
    if data_dir is not None:
        return Path(data_dir).expanduser()
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        root = Path(env).expanduser()
        if not root.is_dir():
            raise DataNotFoundError(f"GLUE data folder {str(root)!r} (from ${DATA_DIR_ENV}) does not exist")
        return root
    if source != "auto":
        raise ValueError(f"source={source!r} needs a local folder: pass data_dir or set {DATA_DIR_ENV}")
    return None


def load_glue(
    task: str | TaskSpec,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    seed: int = 0,
    max_train_examples: int | None = None,
    max_eval_examples: int | None = None,
    dev_split_fraction: float = 0.2,
    source: Source = "auto",
) -> GlueData:
    """Load the train and eval sets of a GLUE task.

    Parameters
    ----------
    task : str or TaskSpec
        Task name (``sst2``, ``qnli``, ``qqp``, ``mnli``, ``rte``, ``mrpc``, ``cola``).
    data_dir : str or path-like, optional
        GLUE root or task folder. Defaults to ``$FEDTUNE_DATA_DIR``, then the hub.
    seed : int
        Seed for the dev-set split and the subsampling.
    max_train_examples, max_eval_examples : int, optional
        Keep a seeded random subset of at most this many rows (original order kept).
    dev_split_fraction : float
        Share of the dev set held out for evaluation when there is no local train split.
    source : {"auto", "hub", "local-parquet", "local-tsv"}
        Force one source. ``"auto"`` prefers parquet over TSV in a local folder.

    Returns
    -------
    GlueData

    Raises
    ------
    ValueError
        Unknown task, bad ``source`` or bad numeric arguments.
    DataNotFoundError
        The folder does not exist, holds no data for the task, or the hub is unreachable.
    """
    spec = get_task_spec(task)
    fraction = _check_fraction(dev_split_fraction)
    max_train = _check_limit("max_train_examples", max_train_examples)
    max_eval = _check_limit("max_eval_examples", max_eval_examples)
    if source not in ("auto", "hub", "local-parquet", "local-tsv"):
        raise ValueError(f"unknown source {source!r}; expected auto, hub, local-parquet or local-tsv")

    root = _resolve_root(data_dir, source)
    notes: list[str] = []
    task_dir: Path | None
    if root is None:
        train, eval_ = _load_hub(spec)
        used, task_dir = "hub", None
    else:
        task_dir = resolve_task_dir(root, spec)
        fmt = cast("Format | None", None if source == "auto" else source.removeprefix("local-"))
        loaded = load_local_splits(task_dir, spec, fmt)
        used = f"local-{loaded.fmt}"
        notes.extend(loaded.notes)
        eval_ = loaded.eval
        if loaded.train is not None:
            train = loaded.train
        else:
            n_dev = len(eval_)
            train, eval_, kind = _split_dev(eval_, fraction, seed)
            pct = round(100 * fraction)
            notes.append(
                f"{spec.name} has no local train split: train and eval are a seeded "
                f"{kind} {100 - pct}/{pct} split of the {spec.eval_split} set "
                f"({len(train):,} + {len(eval_):,} of {n_dev:,} rows, seed {seed}); "
                "scores are not comparable to official GLUE dev results"
            )

    if max_train is not None and max_train < len(train):
        notes.append(f"train subsampled to {max_train:,} of {len(train):,} examples (seed {seed})")
        train = _subsample(train, max_train, seed, stream=1)
    if max_eval is not None and max_eval < len(eval_):
        notes.append(f"eval subsampled to {max_eval:,} of {len(eval_):,} examples (seed {seed})")
        eval_ = _subsample(eval_, max_eval, seed, stream=2)
    return GlueData(spec=spec, train=train, eval=eval_, source=used, notes=notes, data_dir=task_dir)
