"""partition_dataset on real GLUE train sets: coverage, reproducibility, skew, errors."""

from __future__ import annotations

from pathlib import Path

import datasets
import numpy as np
import pytest

from fedtune.data.glue import label_array, load_glue
from fedtune.data.partition import (
    PartitionSpec,
    describe_partitions,
    label_skew,
    parse_partition_spec,
    partition_dataset,
)

NUM_CLIENTS = 10


@pytest.fixture(scope="module")
def sst2_train(glue_dir: Path) -> datasets.Dataset:
    """SST-2 train (67,349 rows) with a ``row`` column to track every example."""
    train = load_glue("sst2", glue_dir).train
    return train.add_column("row", np.arange(len(train)))


@pytest.fixture(scope="module")
def mnli_train(glue_dir: Path) -> datasets.Dataset:
    """MNLI train (7,852 rows of the dev split, 3 labels) with a ``row`` column."""
    train = load_glue("mnli", glue_dir).train
    return train.add_column("row", np.arange(len(train)))


def row_ids(parts: list[datasets.Dataset]) -> list[list[int]]:
    return [p["row"][:] for p in parts]


def assert_exact_cover(parts: list[datasets.Dataset], n: int) -> None:
    ids = np.concatenate([np.asarray(r, dtype=np.int64) for r in row_ids(parts)])
    assert len(ids) == n
    assert np.array_equal(np.sort(ids), np.arange(n)), "every example exactly once"
    assert all(len(p) > 0 for p in parts)


@pytest.mark.parametrize(("scheme", "alpha"), [("iid", None), ("dirichlet", 0.1), ("dirichlet", 1.0)])
@pytest.mark.parametrize("which", ["sst2_train", "mnli_train"])
def test_partitions_cover_every_example_once(
    request: pytest.FixtureRequest, which: str, scheme: str, alpha: float | None
) -> None:
    ds = request.getfixturevalue(which)
    parts = partition_dataset(ds, NUM_CLIENTS, scheme, alpha, seed=0)
    assert len(parts) == NUM_CLIENTS
    assert_exact_cover(parts, len(ds))
    assert parts[0].column_names == ds.column_names
    # rows keep their content: the label stored with each row id is the original one
    labels = label_array(ds)
    for p in parts[:3]:
        assert np.array_equal(label_array(p), labels[np.asarray(p["row"][:])])


def test_iid_sizes_are_balanced_and_shuffled(sst2_train: datasets.Dataset) -> None:
    parts = partition_dataset(sst2_train, NUM_CLIENTS, "iid", seed=0)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert row_ids(parts)[0][:5] != list(range(5))  # shuffled, not the first rows


@pytest.mark.parametrize(("scheme", "alpha"), [("iid", None), ("dirichlet", 0.3)])
def test_partitions_are_reproducible(sst2_train: datasets.Dataset, scheme: str, alpha: float | None) -> None:
    a = row_ids(partition_dataset(sst2_train, NUM_CLIENTS, scheme, alpha, seed=7))
    b = row_ids(partition_dataset(sst2_train, NUM_CLIENTS, scheme, alpha, seed=7))
    c = row_ids(partition_dataset(sst2_train, NUM_CLIENTS, scheme, alpha, seed=8))
    assert a == b
    assert a != c


def test_dirichlet_low_alpha_is_much_more_skewed_than_iid(
    sst2_train: datasets.Dataset, mnli_train: datasets.Dataset
) -> None:
    # label_skew: mean total-variation distance of client label mixes from the pooled mix.
    # Measured at seeds 0-2: IID <= 0.006 (SST-2) / 0.023 (MNLI); Dirichlet(0.1) >= 0.45.
    for ds in (sst2_train, mnli_train):
        for seed in range(3):
            iid = label_skew(partition_dataset(ds, NUM_CLIENTS, "iid", seed=seed))
            skewed = label_skew(partition_dataset(ds, NUM_CLIENTS, "dirichlet", 0.1, seed=seed))
            assert iid < 0.05
            assert skewed > 0.25
            assert skewed > 10 * iid


def test_large_alpha_is_close_to_iid(sst2_train: datasets.Dataset) -> None:
    assert label_skew(partition_dataset(sst2_train, NUM_CLIENTS, "dirichlet", 1000.0, seed=0)) < 0.05


def test_min_partition_size_is_respected(mnli_train: datasets.Dataset) -> None:
    parts = partition_dataset(mnli_train, NUM_CLIENTS, "dirichlet", 0.1, seed=1, min_partition_size=50)
    assert min(len(p) for p in parts) >= 50
    assert_exact_cover(parts, len(mnli_train))


def test_describe_partitions_hand_checked() -> None:
    ds = datasets.Dataset.from_dict({"label": [0, 0, 1, 1, 1, 2]}).cast_column(
        "label", datasets.ClassLabel(names=["a", "b", "c"])
    )
    parts = [ds.select([0, 2, 3]), ds.select([1, 4, 5])]
    assert describe_partitions(parts) == [
        {"client": 0, "examples": 3, "label_counts": {0: 1, 1: 2, 2: 0}},
        {"client": 1, "examples": 3, "label_counts": {0: 1, 1: 1, 2: 1}},
    ]
    # pooled mix (2, 3, 1)/6; client 0 (1, 2, 0)/3: TV = (0 + 1/6 + 1/6)/2 = 1/6; client 1 the same
    assert label_skew(parts) == pytest.approx(1 / 6)


def test_label_skew_extremes() -> None:
    ds = datasets.Dataset.from_dict({"label": [0, 0, 1, 1]})
    assert label_skew([ds.select([0, 2]), ds.select([1, 3])]) == 0.0
    assert label_skew([ds.select([0, 1]), ds.select([2, 3])]) == 0.5


def test_describe_real_partitions_add_up(sst2_train: datasets.Dataset) -> None:
    report = describe_partitions(partition_dataset(sst2_train, 4, "dirichlet", 0.5, seed=0))
    assert [r["client"] for r in report] == [0, 1, 2, 3]
    assert sum(r["examples"] for r in report) == len(sst2_train)
    assert sum(r["label_counts"][1] for r in report) == 37_569
    assert all(r["examples"] == sum(r["label_counts"].values()) for r in report)


# --- parsing -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("iid", PartitionSpec("iid")),
        ("IID ", PartitionSpec("iid")),
        ("dirichlet", PartitionSpec("dirichlet", 0.5)),
        ("dirichlet:0.1", PartitionSpec("dirichlet", 0.1)),
        ("dirichlet: 2", PartitionSpec("dirichlet", 2.0)),
    ],
)
def test_parse_partition_spec(text: str, expected: PartitionSpec) -> None:
    assert parse_partition_spec(text) == expected


def test_partition_spec_str_round_trips() -> None:
    for text in ("iid", "dirichlet:0.1", "dirichlet:0.5"):
        assert str(parse_partition_spec(text)) == text


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("shards", "'shards'"),
        ("iid:3", "iid.*'iid:3'"),
        ("dirichlet:abc", "'abc' is not a number"),
        ("dirichlet:0", "alpha.*0.0"),
        ("dirichlet:-1", "alpha.*-1"),
        ("dirichlet:nan", "alpha.*nan"),
        ("dirichlet:inf", "alpha.*inf"),
    ],
)
def test_parse_partition_spec_errors(text: str, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        parse_partition_spec(text)


# --- refusals ------------------------------------------------------------------------------


def test_more_clients_than_examples_is_refused() -> None:
    ds = datasets.Dataset.from_dict({"text": list("abcde"), "label": [0, 1, 0, 1, 0]})
    for scheme in ("iid", "dirichlet"):
        with pytest.raises(ValueError, match="cannot split 5 examples across 6 clients"):
            partition_dataset(ds, 6, scheme)
    parts = partition_dataset(ds, 5, "iid")
    assert [len(p) for p in parts] == [1] * 5


def test_impossible_dirichlet_split_is_refused() -> None:
    ds = datasets.Dataset.from_dict({"label": [0] * 20 + [1] * 20})
    with pytest.raises(ValueError, match="40 examples across 10 clients.*alpha=0.01"):
        partition_dataset(ds, 10, "dirichlet", 0.01, seed=0)
    with pytest.raises(ValueError, match="at least 5 examples each from 40"):
        partition_dataset(ds, 10, "dirichlet", 1.0, min_partition_size=5)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"num_clients": 0}, "num_clients must be >= 1, got 0"),
        ({"num_clients": 2.0}, "num_clients must be an integer, got 2.0"),
        ({"num_clients": 2, "scheme": "shards"}, "'shards'"),
        ({"num_clients": 2, "scheme": "dirichlet", "alpha": 0.0}, "alpha.*0.0"),
        ({"num_clients": 2, "scheme": "dirichlet", "min_partition_size": 0}, "min_partition_size.*0"),
    ],
)
def test_bad_arguments_are_named(kwargs: dict, pattern: str) -> None:
    ds = datasets.Dataset.from_dict({"label": [0, 1, 0, 1]})
    with pytest.raises(ValueError, match=pattern):
        partition_dataset(ds, **kwargs)


def test_dirichlet_needs_labels() -> None:
    ds = datasets.Dataset.from_dict({"text": list("abcd")})
    with pytest.raises(ValueError, match="'label' column"):
        partition_dataset(ds, 2, "dirichlet")
    assert len(partition_dataset(ds, 2, "iid")) == 2
