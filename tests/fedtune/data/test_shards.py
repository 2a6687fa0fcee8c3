"""``fedtune partition`` shards: the simulation's split, read back and checked by the client."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fedtune.cli import main
from fedtune.data import load_glue, partition_dataset
from fedtune.data.shards import read_shard, shard_info


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory, glue_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("shards")
    assert (
        main(
            [
                "partition",
                "--task",
                "sst2",
                "--clients",
                "3",
                "--out",
                str(out),
                "--data-dir",
                str(glue_dir),
                "--max-train-examples",
                "90",
                "--seed",
                "3",
                "--partition",
                "dirichlet:1.0",
            ]
        )
        == 0
    )
    return out


def test_shards_are_the_simulation_split(shards: Path, glue_dir: Path) -> None:
    data = load_glue("sst2", glue_dir, seed=3, max_train_examples=90)
    expected = partition_dataset(data.train, 3, "dirichlet", 1.0, 3)
    for index, part in enumerate(expected):
        got = read_shard(shards / f"client-{index}", "sst2")
        assert got["sentence"] == part["sentence"] and got["label"] == part["label"]
        info = shard_info(shards / f"client-{index}")
        assert (info.task, info.index, info.name, info.examples) == ("sst2", index, f"client-{index}", len(part))
    assert (shards / "partition.json").exists()


def test_existing_shards_are_not_overwritten(shards: Path, glue_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["partition", "--clients", "3", "--out", str(shards), "--data-dir", str(glue_dir)]) == 2
    assert "already holds shards" in capsys.readouterr().err


def test_a_shard_of_another_task_is_refused(shards: Path) -> None:
    with pytest.raises(ValueError, match="holds task 'sst2', not 'rte'"):
        read_shard(shards / "client-0", "rte")


def test_a_plain_parquet_file_is_accepted_and_checked(tmp_path: Path) -> None:
    good = tmp_path / "mine.parquet"
    pq.write_table(pa.table({"sentence": ["good film", "bad film"], "label": [1, 0], "extra": [0, 0]}), good)
    assert read_shard(good, "sst2").column_names == ["sentence", "label"]
    bad_labels = tmp_path / "labels.parquet"
    pq.write_table(pa.table({"sentence": ["x"], "label": [5]}), bad_labels)
    with pytest.raises(ValueError, match=r"labels \[5\] outside 0..1"):
        read_shard(bad_labels, "sst2")
    no_text = tmp_path / "cols.parquet"
    pq.write_table(pa.table({"text": ["x"], "label": [1]}), no_text)
    with pytest.raises(ValueError, match="lacks the column"):
        read_shard(no_text, "sst2")


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--clients", "0"], "--clients must be an integer >= 1"),
        (["--clients", "2", "--task", "nope"], "unknown GLUE task 'nope'"),
        (["--clients", "2", "--partition", "zipf"], "unknown partition scheme"),
    ],
)
def test_bad_partition_input_is_one_clear_line(
    argv: list[str], fragment: str, tmp_path: Path, glue_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["partition", "--out", str(tmp_path / "s"), "--data-dir", str(glue_dir), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and "\n" not in err
