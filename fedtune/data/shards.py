"""Per-client shard files: what ``fedtune partition`` writes and a deployed client reads.

Layout of ``fedtune partition --out DIR``::

    DIR/partition.json                 the split: task, scheme, seed, sizes, label counts, notes
    DIR/client-K/train.parquet         client K's training examples (text columns and label)
    DIR/client-K/shard.json            task, client index, example count, label counts, notes

A client machine needs only its own ``client-K`` folder. ``fedtune client --data PATH`` accepts that
folder or a parquet file with the task's text columns and an integer ``label`` column (e.g. the
organisation's own data).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import pyarrow.parquet as pq

from fedtune.data.glue import TaskSpec, get_task_spec, load_glue
from fedtune.data.local import DataNotFoundError
from fedtune.data.partition import describe_partitions, parse_partition_spec, partition_dataset
from fedtune.io import atomic_write_json, read_json

__all__ = ["ShardInfo", "write_shards", "read_shard", "shard_info", "SHARD_FILE", "SHARD_SCHEMA"]

SHARD_FILE = "train.parquet"
SHARD_SCHEMA = "fedtune.shard/1"


@dataclass(frozen=True)
class ShardInfo:
    """What a client knows about its shard (from ``shard.json`` when present)."""

    path: Path
    task: str | None
    examples: int
    index: int | None = None
    name: str | None = None
    notes: list[str] = field(default_factory=list)


def write_shards(
    task: str,
    clients: int,
    out: str | Path,
    *,
    data_dir: str | None = None,
    partition: str = "iid",
    seed: int = 0,
    max_train_examples: int | None = None,
    force: bool = False,
) -> list[ShardInfo]:
    """Split a GLUE task's training set into ``clients`` shard folders under ``out``.

    The split is the one ``fedtune simulate`` makes with the same task, partition, seed and
    ``max_train_examples``, so deployed and simulated runs can be compared.

    Raises
    ------
    ValueError
        Bad task, partition or client count, or existing shards without ``force``.
    """
    spec = get_task_spec(task)
    if isinstance(clients, bool) or not isinstance(clients, int) or clients < 1:
        raise ValueError(f"--clients must be an integer >= 1, got {clients!r}")
    scheme = parse_partition_spec(partition)
    folder = Path(out)
    if (folder / "partition.json").exists() and not force:
        raise ValueError(
            f"{folder} already holds shards (partition.json); pass --force to overwrite or choose another --out"
        )
    data = load_glue(spec, data_dir, seed=seed, max_train_examples=max_train_examples)
    parts = [data.train] if clients == 1 else partition_dataset(data.train, clients, scheme.scheme, scheme.alpha, seed)
    described = describe_partitions(parts)
    infos = []
    for index, part in enumerate(parts):
        name = f"client-{index}"
        shard_dir = folder / name
        shard_dir.mkdir(parents=True, exist_ok=True)
        pq.write_table(part.with_format("arrow")[:], shard_dir / SHARD_FILE)
        meta = {
            "schema": SHARD_SCHEMA,
            "task": spec.name,
            "name": name,
            "client": index,
            "clients": clients,
            "examples": len(part),
            "label_counts": described[index]["label_counts"],
            "partition": str(scheme),
            "seed": seed,
            "source": data.source,
            "notes": list(data.notes),
        }
        atomic_write_json(shard_dir / "shard.json", meta)
        infos.append(ShardInfo(shard_dir / SHARD_FILE, spec.name, len(part), index, name, list(data.notes)))
    atomic_write_json(
        folder / "partition.json",
        {
            "schema": "fedtune.partition/1",
            "task": spec.name,
            "clients": clients,
            "partition": str(scheme),
            "seed": seed,
            "max_train_examples": max_train_examples,
            "source": data.source,
            "notes": list(data.notes),
            "shards": described,
        },
    )
    return infos


def _parquet_path(path: Path) -> Path:
    if path.is_dir():
        candidate = path / SHARD_FILE
        if not candidate.is_file():
            raise DataNotFoundError(
                f"--data {str(path)!r} holds no {SHARD_FILE} "
                "(expected a `fedtune partition` client folder or a parquet file)"
            )
        return candidate
    if path.is_file():
        if path.suffix != ".parquet":
            raise ValueError(f"--data {str(path)!r} is not a parquet file or a shard folder")
        return path
    raise DataNotFoundError(f"--data {str(path)!r} does not exist")


def shard_info(path: str | Path) -> ShardInfo:
    """Metadata of the shard at ``path`` without loading it (rows counted from the parquet footer)."""
    folder = Path(path)
    parquet = _parquet_path(folder)
    meta_file = parquet.parent / "shard.json"
    meta: dict[str, Any] = read_json(meta_file) if meta_file.is_file() else {}
    if meta and meta.get("schema") != SHARD_SCHEMA:
        raise ValueError(f"{meta_file} is not a fedtune shard description (schema {SHARD_SCHEMA!r} expected)")
    try:
        rows = pq.ParquetFile(parquet).metadata.num_rows
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise ValueError(f"cannot read {parquet}: {type(err).__name__}: {err}") from None
    if rows < 1:
        raise ValueError(f"{parquet} holds no examples")
    return ShardInfo(
        parquet, meta.get("task"), int(rows), meta.get("client"), meta.get("name"), list(meta.get("notes", []))
    )


def read_shard(path: str | Path, task: str | TaskSpec) -> datasets.Dataset:
    """The shard at ``path`` as a dataset with ``task``'s text columns and label features.

    Raises
    ------
    ValueError
        The shard belongs to another task, lacks columns, or has labels outside the task's classes.
    """
    spec = get_task_spec(task)
    info = shard_info(path)
    if info.task is not None and info.task != spec.name:
        raise ValueError(f"the shard at {info.path} holds task {info.task!r}, not {spec.name!r}")
    table = pq.read_table(info.path).replace_schema_metadata(None)
    columns = [*spec.text_columns, "label"]
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise ValueError(f"{info.path} lacks the column(s) {missing} of task {spec.name!r} (has {table.column_names})")
    labels = table.column("label").to_pylist()
    bad = sorted({v for v in labels if not isinstance(v, int) or not 0 <= v < spec.num_labels}, key=str)
    if bad:
        raise ValueError(f"{info.path}: labels {bad[:5]} outside 0..{spec.num_labels - 1} for task {spec.name!r}")
    features = spec.features()
    table = table.select(columns).cast(features.arrow_schema)
    return datasets.Dataset(table, info=datasets.DatasetInfo(features=features))
