"""Readers for a local GLUE copy: Hugging Face parquet files and GLUE TSV files.

Folder layout (either file format may be absent)::

    <glue root>/<task>/hf_parquet/<split>-00000-of-00001.parquet
    <glue root>/<task>/{train,dev}.tsv          (MNLI: dev_matched.tsv)

The task folder may also use the official GLUE spelling (``SST-2``, ``CoLA``, ...).
TSV quirks handled here: CoLA has no header, MRPC starts with a UTF-8 BOM, quoting is
off (texts may start with a bare ``"``), QNLI/RTE/MNLI labels are strings.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import datasets
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

if TYPE_CHECKING:
    from fedtune.data.glue import TaskSpec

__all__ = ["DataNotFoundError", "LocalSplits", "TsvLayout", "load_local_splits", "resolve_task_dir"]

Format = Literal["parquet", "tsv"]


class DataNotFoundError(FileNotFoundError):
    """The requested GLUE data could not be found locally or on the hub."""


@dataclass(frozen=True)
class TsvLayout:
    """Where a task's fields sit in the GLUE TSV files.

    Parameters
    ----------
    files : dict
        Split name (``"train"`` or the task's eval split) to file name.
    columns : dict
        Canonical column (text columns and ``label``) to TSV column.
    header : tuple of str or None
        Column names for header-less files (CoLA); ``None`` when the file has a header.
    string_labels : bool
        Labels are class names (``entailment``) rather than integers.
    """

    files: dict[str, str]
    columns: dict[str, str]
    header: tuple[str, ...] | None = None
    string_labels: bool = False


_TRAIN_DEV = {"train": "train.tsv", "validation": "dev.tsv"}

TSV_LAYOUTS: dict[str, TsvLayout] = {
    "sst2": TsvLayout(_TRAIN_DEV, {"sentence": "sentence", "label": "label"}),
    "qnli": TsvLayout(
        _TRAIN_DEV, {"question": "question", "sentence": "sentence", "label": "label"}, string_labels=True
    ),
    "qqp": TsvLayout(_TRAIN_DEV, {"question1": "question1", "question2": "question2", "label": "is_duplicate"}),
    "mnli": TsvLayout(
        {"train": "train.tsv", "validation_matched": "dev_matched.tsv"},
        {"premise": "sentence1", "hypothesis": "sentence2", "label": "gold_label"},
        string_labels=True,
    ),
    "rte": TsvLayout(
        _TRAIN_DEV, {"sentence1": "sentence1", "sentence2": "sentence2", "label": "label"}, string_labels=True
    ),
    "mrpc": TsvLayout(_TRAIN_DEV, {"sentence1": "#1 String", "sentence2": "#2 String", "label": "Quality"}),
    "cola": TsvLayout(
        _TRAIN_DEV, {"sentence": "sentence", "label": "label"}, header=("source", "label", "original_label", "sentence")
    ),
}
"""TSV layout per task, as written by GLUE's ``download_glue_data.py``."""


@dataclass
class LocalSplits:
    """Raw splits read from a task folder (``train`` is ``None`` when absent)."""

    train: datasets.Dataset | None
    eval: datasets.Dataset
    fmt: Format
    notes: list[str] = field(default_factory=list)


def resolve_task_dir(root: Path, spec: TaskSpec) -> Path:
    """Find the folder of ``spec`` given a GLUE root or the task folder itself.

    Raises
    ------
    DataNotFoundError
        If ``root`` does not exist or holds no folder for the task.
    """
    if not root.exists():
        raise DataNotFoundError(f"GLUE data folder {str(root)!r} does not exist")
    if not root.is_dir():
        raise DataNotFoundError(f"GLUE data path {str(root)!r} is not a folder")
    names = dict.fromkeys((spec.name, spec.display_name, spec.display_name.lower()))
    for name in names:
        if (root / name).is_dir():
            return root / name
    if root.name in names or root.name.lower() in names:
        return root
    looked = ", ".join(str(root / n) for n in names)
    raise DataNotFoundError(
        f"no folder for GLUE task {spec.name!r} under {str(root)!r}: looked for {looked} "
        f"(and {str(root)!r} is not itself named after the task)"
    )


def _parquet_files(task_dir: Path, split: str) -> list[Path]:
    return sorted((task_dir / "hf_parquet").glob(f"{split}-*.parquet"))


def _to_dataset(table: pa.Table, spec: TaskSpec, where: str) -> datasets.Dataset:
    """Keep the text columns and ``label``, check labels, attach the canonical features."""
    cols = [*spec.text_columns, "label"]
    missing = [c for c in cols if c not in table.column_names]
    if missing:
        raise DataNotFoundError(f"{where}: columns {missing} missing for task {spec.name!r} (has {table.column_names})")
    features = spec.features()
    table = table.select(cols).replace_schema_metadata(None).cast(features.arrow_schema)
    _check_labels(table.column("label").to_numpy(), spec, where)
    return datasets.Dataset(table, info=datasets.DatasetInfo(features=features))


def _read_parquet(files: list[Path], spec: TaskSpec) -> datasets.Dataset:
    table = pa.concat_tables([pq.read_table(f).replace_schema_metadata(None) for f in files])
    return _to_dataset(table, spec, ", ".join(str(f) for f in files))


def _check_labels(labels: np.ndarray, spec: TaskSpec, where: str) -> None:
    bad = sorted(set(labels[(labels < 0) | (labels >= spec.num_labels)].tolist()))
    if bad:
        raise ValueError(
            f"{where}: labels {bad} outside 0..{spec.num_labels - 1} for task {spec.name!r} "
            "(label -1 marks an unlabelled test split, which is never used)"
        )


def _read_tsv(path: Path, spec: TaskSpec, layout: TsvLayout, notes: list[str]) -> datasets.Dataset:
    try:
        df = pd.read_csv(
            path,
            sep="\t",
            quoting=csv.QUOTE_NONE,
            encoding="utf-8-sig",
            dtype=str,
            keep_default_na=False,
            header=None if layout.header else 0,
            names=list(layout.header) if layout.header else None,
        )
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot parse GLUE TSV {str(path)!r}: {exc}") from exc
    missing = [c for c in layout.columns.values() if c not in df.columns]
    if missing:
        raise DataNotFoundError(f"{path}: columns {missing} missing for task {spec.name!r} (has {list(df.columns)})")
    df = df[list(layout.columns.values())].rename(columns={v: k for k, v in layout.columns.items()})
    df = df.fillna("")  # fields missing from short lines
    unlabelled = df["label"].str.strip() == ""
    if unlabelled.any():
        notes.append(f"{path}: dropped {int(unlabelled.sum())} rows without a label (short or malformed lines)")
        df = df[~unlabelled]
    raw = df["label"].str.strip()
    if layout.string_labels:
        ids = {name: i for i, name in enumerate(spec.label_names)}
        unknown = sorted(set(raw) - set(ids))
        if unknown:
            raise ValueError(f"{str(path)!r}: unknown labels {unknown[:5]}; expected {list(ids)}")
        df["label"] = raw.map(ids)
    else:
        try:
            df["label"] = raw.astype(int)
        except ValueError as exc:
            raise ValueError(f"{str(path)!r}: non-integer labels ({exc})") from exc
    table = pa.Table.from_pandas(df, preserve_index=False)
    return _to_dataset(table, spec, str(path))


def _load_parquet(task_dir: Path, spec: TaskSpec) -> LocalSplits | None:
    eval_files = _parquet_files(task_dir, spec.eval_split)
    if not eval_files:
        return None
    train_files = _parquet_files(task_dir, spec.train_split)
    return LocalSplits(
        train=_read_parquet(train_files, spec) if train_files else None,
        eval=_read_parquet(eval_files, spec),
        fmt="parquet",
    )


def _load_tsv(task_dir: Path, spec: TaskSpec) -> LocalSplits | None:
    layout = TSV_LAYOUTS[spec.name]
    eval_path = task_dir / layout.files[spec.eval_split]
    if not eval_path.is_file():
        return None
    train_path = task_dir / layout.files[spec.train_split]
    notes: list[str] = []
    train = _read_tsv(train_path, spec, layout, notes) if train_path.is_file() else None
    return LocalSplits(train=train, eval=_read_tsv(eval_path, spec, layout, notes), fmt="tsv", notes=notes)


def load_local_splits(task_dir: Path, spec: TaskSpec, fmt: Format | None = None) -> LocalSplits:
    """Read the train (if present) and eval splits of ``spec`` from ``task_dir``.

    Parameters
    ----------
    task_dir : pathlib.Path
        The task folder (see :func:`resolve_task_dir`).
    spec : TaskSpec
        The task.
    fmt : {"parquet", "tsv"}, optional
        Force a format; by default parquet is used when its eval split exists, else TSV.

    Raises
    ------
    DataNotFoundError
        If no eval split is found in the requested format(s); the message lists the
        files looked for.
    """
    readers = {"parquet": _load_parquet, "tsv": _load_tsv}
    order: list[Format] = [fmt] if fmt else ["parquet", "tsv"]
    for name in order:
        splits = readers[name](task_dir, spec)
        if splits is not None:
            return splits
    looked = {
        "parquet": str(task_dir / "hf_parquet" / f"{spec.eval_split}-*.parquet"),
        "tsv": str(task_dir / TSV_LAYOUTS[spec.name].files[spec.eval_split]),
    }
    raise DataNotFoundError(
        f"no {spec.eval_split} split for GLUE task {spec.name!r} in {str(task_dir)!r}: "
        f"looked for {' and '.join(looked[n] for n in order)}"
    )
