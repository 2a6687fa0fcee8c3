"""load_glue on the real GLUE copy: row counts, labels, formats, dev splits, errors."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import pytest

from fedtune.data import glue as glue_mod
from fedtune.data.glue import (
    DATA_DIR_ENV,
    TASKS,
    DataNotFoundError,
    GlueData,
    get_task_spec,
    label_array,
    load_glue,
)

# Row counts from shared/data/glue/README.md.
WITH_TRAIN = {"sst2": (67_349, 872), "rte": (2_490, 277), "mrpc": (3_668, 408), "cola": (8_551, 1_043)}
DEV_ONLY = {"qnli": 5_463, "qqp": 40_430, "mnli": 9_815}


def rows(ds: datasets.Dataset) -> list[tuple]:
    """All rows as tuples (text columns..., label), in order."""
    data = ds[:]
    return list(zip(*(data[c] for c in ds.column_names)))


def parquet_rows(glue_dir: Path, task: str, split: str) -> list[tuple]:
    spec = TASKS[task]
    df = pd.read_parquet(glue_dir / task / "hf_parquet" / f"{split}-00000-of-00001.parquet")
    return list(df[[*spec.text_columns, "label"]].itertuples(index=False, name=None))


@pytest.fixture(scope="module")
def local(glue_dir: Path) -> dict[str, GlueData]:
    """Every task, loaded once per module with default arguments."""
    return {task: load_glue(task, glue_dir) for task in TASKS}


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)


# --- task specs ---------------------------------------------------------------------------


def test_task_specs() -> None:
    assert set(TASKS) == {"sst2", "qnli", "qqp", "mnli", "rte", "mrpc", "cola"}
    assert TASKS["mnli"].eval_split == "validation_matched"
    assert TASKS["mnli"].num_labels == 3
    assert TASKS["cola"].main_metric == "matthews_correlation"
    for task in ("mrpc", "qqp"):
        assert "f1" in TASKS[task].metric_names
        assert TASKS[task].main_metric == "accuracy"
    assert TASKS["sst2"].text_columns == ("sentence",)
    assert TASKS["qnli"].text_columns == ("question", "sentence")
    assert get_task_spec("SST-2") is TASKS["sst2"]
    with pytest.raises(AttributeError):
        TASKS["rte"].num_labels = 3  # type: ignore[misc]


# --- real data: row counts and labels -----------------------------------------------------


@pytest.mark.parametrize("task", sorted(WITH_TRAIN))
def test_tasks_with_train_split_have_readme_row_counts(local: dict[str, GlueData], task: str) -> None:
    data = local[task]
    spec = TASKS[task]
    assert data.source == "local-parquet"
    assert (len(data.train), len(data.eval)) == WITH_TRAIN[task]
    assert data.notes == []
    for ds in (data.train, data.eval):
        assert ds.column_names == [*spec.text_columns, "label"]
        assert set(label_array(ds).tolist()) == set(range(spec.num_labels))


@pytest.mark.parametrize("task", sorted(DEV_ONLY))
def test_dev_only_tasks_are_split_with_a_note(glue_dir: Path, local: dict[str, GlueData], task: str) -> None:
    data, spec, n = local[task], TASKS[task], DEV_ONLY[task]
    n_eval = math.ceil(0.2 * n)
    assert (len(data.train), len(data.eval)) == (n - n_eval, n_eval)
    assert len(data.notes) == 1
    note = data.notes[0]
    for part in (task, "no local train split", "80/20", spec.eval_split, "seed 0", f"{n:,}"):
        assert part in note
    # train + eval is exactly the dev set: nothing lost, nothing duplicated.
    dev = parquet_rows(glue_dir, task, spec.eval_split)
    assert Counter(rows(data.train)) + Counter(rows(data.eval)) == Counter(dev)
    for ds in (data.train, data.eval):
        assert set(label_array(ds).tolist()) == set(range(spec.num_labels))
    # stratified: each label's share in eval is within one example of its share in dev
    dev_counts = np.bincount([r[-1] for r in dev])
    eval_counts = np.bincount(label_array(data.eval))
    assert np.all(np.abs(eval_counts - dev_counts * n_eval / n) <= 1)


def test_readme_label_distributions(local: dict[str, GlueData]) -> None:
    assert np.bincount(label_array(local["sst2"].train)).tolist() == [29_780, 37_569]
    mnli = np.bincount(label_array(local["mnli"].train)) + np.bincount(label_array(local["mnli"].eval))
    assert mnli.tolist() == [3_479, 3_123, 3_213]
    qqp = np.bincount(label_array(local["qqp"].train)) + np.bincount(label_array(local["qqp"].eval))
    assert qqp.tolist() == [25_545, 14_885]


# --- parquet and TSV agree ------------------------------------------------------------------


@pytest.mark.parametrize("task", ["sst2", "rte", "mrpc", "cola", "qnli"])
def test_parquet_and_tsv_give_identical_rows(glue_dir: Path, local: dict[str, GlueData], task: str) -> None:
    tsv = load_glue(task, glue_dir, source="local-tsv")
    assert tsv.source == "local-tsv"
    parquet = local[task]
    assert tsv.train.features == parquet.train.features
    assert rows(tsv.train) == rows(parquet.train)
    assert rows(tsv.eval) == rows(parquet.eval)


def test_tsv_quirks_are_handled(glue_dir: Path) -> None:
    cola = load_glue("cola", glue_dir, source="local-tsv")  # no header
    assert cola.train[0] == {
        "sentence": "Our friends won't buy this analysis, let alone the next one we propose.",
        "label": 1,
    }
    mrpc = load_glue("mrpc", glue_dir, source="local-tsv")  # UTF-8 BOM
    assert mrpc.train[0]["sentence1"].startswith("Amrozi accused his brother")
    sst2 = load_glue("sst2", glue_dir, source="local-tsv", max_eval_examples=5)  # trailing space
    assert all(s.endswith(" ") for s in sst2.eval["sentence"])
    qnli = load_glue("qnli", glue_dir, source="local-tsv")  # bare quote, string labels
    everything = rows(qnli.train) + rows(qnli.eval)
    assert any(r[1].startswith('" Luis Walter Alvarez') for r in everything)
    assert len(everything) == DEV_ONLY["qnli"]


def _write_tsv(path: Path, header: list[str], lines: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join("\t".join(x) for x in [header, *lines]) + "\n"
    path.write_text(text, encoding="utf-8")


def test_mnli_and_qqp_tsv_layouts(glue_dir: Path, tmp_path: Path, local: dict[str, GlueData]) -> None:
    # The offline copy has no MNLI/QQP TSV: write them in the GLUE layout from the parquet.
    names = TASKS["mnli"].label_names
    mnli = parquet_rows(glue_dir, "mnli", "validation_matched")
    _write_tsv(
        tmp_path / "MNLI" / "dev_matched.tsv",
        ["index", "genre", "sentence1", "sentence2", "label1", "gold_label"],
        [[str(i), "fiction", p, h, names[y], names[y]] for i, (p, h, y) in enumerate(mnli)],
    )
    qqp = parquet_rows(glue_dir, "qqp", "validation")
    _write_tsv(
        tmp_path / "QQP" / "dev.tsv",
        ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"],
        [[str(i), "1", "2", a, b, str(y)] for i, (a, b, y) in enumerate(qqp)],
    )
    for task in ("mnli", "qqp"):
        tsv = load_glue(task, tmp_path)
        assert tsv.source == "local-tsv"
        assert rows(tsv.train) == rows(local[task].train)
        assert rows(tsv.eval) == rows(local[task].eval)


def test_tsv_rows_with_missing_fields_are_dropped_with_a_note(tmp_path: Path) -> None:
    _write_tsv(
        tmp_path / "sst2" / "dev.tsv",
        ["sentence", "label"],
        [["good film ", "1"], ["truncated line"], ["bad film ", "0"], ["fine ", "1"]],
    )
    data = load_glue("sst2", tmp_path, max_train_examples=None)
    assert len(data.train) + len(data.eval) == 3
    assert any("dropped 1 rows without a label" in n for n in data.notes)


# --- seeded subsampling ---------------------------------------------------------------------


def test_subsample_is_seeded_random_and_reproducible(glue_dir: Path, local: dict[str, GlueData]) -> None:
    a = load_glue("rte", glue_dir, seed=3, max_train_examples=100, max_eval_examples=50)
    b = load_glue("rte", glue_dir, seed=3, max_train_examples=100, max_eval_examples=50)
    c = load_glue("rte", glue_dir, seed=4, max_train_examples=100, max_eval_examples=50)
    assert (len(a.train), len(a.eval)) == (100, 50)
    assert rows(a.train) == rows(b.train) and rows(a.eval) == rows(b.eval)
    assert rows(a.train) != rows(c.train)
    full = rows(local["rte"].train)
    assert set(rows(a.train)) <= set(full)
    assert rows(a.train) != full[:100]  # not simply the first rows
    assert "train subsampled to 100 of 2,490 examples (seed 3)" in a.notes
    assert "eval subsampled to 50 of 277 examples (seed 3)" in a.notes


def test_eval_does_not_depend_on_train_limit(glue_dir: Path) -> None:
    a = load_glue("qnli", glue_dir, max_train_examples=10)
    b = load_glue("qnli", glue_dir, max_train_examples=500)
    assert rows(a.eval) == rows(b.eval)
    assert len(a.notes) == 2 and "no local train split" in a.notes[0]


def test_limit_above_size_keeps_everything(glue_dir: Path) -> None:
    data = load_glue("rte", glue_dir, max_eval_examples=10_000)
    assert len(data.eval) == 277 and data.notes == []


def test_dev_split_fraction_and_seed(glue_dir: Path, local: dict[str, GlueData]) -> None:
    half = load_glue("qnli", glue_dir, dev_split_fraction=0.5)
    assert (len(half.train), len(half.eval)) == (2_731, 2_732)
    assert "50/50" in half.notes[0]
    again = load_glue("qnli", glue_dir)
    other = load_glue("qnli", glue_dir, seed=1)
    assert rows(again.eval) == rows(local["qnli"].eval)
    assert rows(other.eval) != rows(again.eval)
    assert "seed 1" in other.notes[0]


# --- where the data comes from ------------------------------------------------------------


def test_data_dir_may_be_the_task_folder(glue_dir: Path, local: dict[str, GlueData]) -> None:
    data = load_glue("mrpc", glue_dir / "mrpc", max_eval_examples=20)
    assert data.data_dir == glue_dir / "mrpc"
    assert rows(data.train) == rows(local["mrpc"].train)


def test_glue_data_folder_spelling(glue_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "RTE").symlink_to(glue_dir / "rte", target_is_directory=True)
    assert len(load_glue("rte", tmp_path).train) == 2_490
    assert len(load_glue("rte", tmp_path / "RTE").eval) == 277


def test_env_var_is_used_and_explicit_dir_wins(glue_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DATA_DIR_ENV, str(glue_dir))
    assert load_glue("rte").source == "local-parquet"
    missing = tmp_path / "nowhere"
    monkeypatch.setenv(DATA_DIR_ENV, str(missing))
    assert len(load_glue("rte", glue_dir).train) == 2_490
    with pytest.raises(DataNotFoundError, match=f"{missing}.*{DATA_DIR_ENV}"):
        load_glue("rte")


def test_hub_unreachable_gives_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub")

    monkeypatch.setattr(glue_mod.datasets, "load_dataset", offline)
    with pytest.raises(DataNotFoundError) as info:
        load_glue("sst2")
    msg = str(info.value)
    assert "--data-dir" in msg and DATA_DIR_ENV in msg and "sst2" in msg
    assert isinstance(info.value, FileNotFoundError)


def test_hub_dataset_is_normalised(glue_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base = glue_dir / "mnli" / "hf_parquet"
    hub = datasets.DatasetDict(
        {
            # the hub has a train split; stand it in with the mismatched dev set
            "train": datasets.Dataset.from_parquet(str(base / "validation_mismatched-00000-of-00001.parquet")),
            "validation_matched": datasets.Dataset.from_parquet(
                str(base / "validation_matched-00000-of-00001.parquet")
            ),
        }
    )
    calls: list[tuple] = []

    def fake(*args: object, **kwargs: object) -> datasets.DatasetDict:
        calls.append(args)
        return hub

    monkeypatch.setattr(glue_mod.datasets, "load_dataset", fake)
    monkeypatch.setattr("fedtune.io.hub_reachable", lambda timeout=2.0: True)  # the hub is faked: no network probe
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    data = load_glue("mnli", max_train_examples=30)
    assert calls == [("nyu-mll/glue", "mnli")]
    assert data.source == "hub" and data.data_dir is None
    assert data.train.column_names == ["premise", "hypothesis", "label"]  # idx dropped
    assert (len(data.train), len(data.eval)) == (30, 9_815)
    assert data.notes == ["train subsampled to 30 of 9,832 examples (seed 0)"]


# --- bad input ------------------------------------------------------------------------------


def test_unknown_task_names_value_and_choices(glue_dir: Path) -> None:
    with pytest.raises(ValueError, match=r"'sst3'.*sst2, qnli, qqp, mnli, rte, mrpc, cola"):
        load_glue("sst3", glue_dir)


def test_missing_folder_names_path(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError, match="does not exist") as info:
        load_glue("rte", tmp_path / "no-such-dir")
    assert str(tmp_path / "no-such-dir") in str(info.value)


def test_folder_without_task_names_what_was_looked_for(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError) as info:
        load_glue("cola", tmp_path)
    assert str(tmp_path / "cola") in str(info.value) and str(tmp_path / "CoLA") in str(info.value)
    (tmp_path / "cola").mkdir()
    with pytest.raises(DataNotFoundError) as info:
        load_glue("cola", tmp_path)
    msg = str(info.value)
    assert "validation-*.parquet" in msg and str(tmp_path / "cola" / "dev.tsv") in msg


def test_forced_tsv_without_tsv_names_file(glue_dir: Path) -> None:
    with pytest.raises(DataNotFoundError, match=r"qqp.*dev\.tsv"):
        load_glue("qqp", glue_dir, source="local-tsv")


def test_unlabelled_split_is_refused(glue_dir: Path, tmp_path: Path) -> None:
    pq_dir = tmp_path / "sst2" / "hf_parquet"
    pq_dir.mkdir(parents=True)
    (pq_dir / "validation-00000-of-00001.parquet").symlink_to(
        glue_dir / "sst2" / "hf_parquet" / "test-00000-of-00001.parquet"
    )
    with pytest.raises(ValueError, match=r"labels \[-1\]"):
        load_glue("sst2", tmp_path)


def test_wrong_task_files_are_refused(glue_dir: Path, tmp_path: Path) -> None:
    pq_dir = tmp_path / "rte" / "hf_parquet"
    pq_dir.mkdir(parents=True)
    (pq_dir / "validation-00000-of-00001.parquet").symlink_to(
        glue_dir / "cola" / "hf_parquet" / "validation-00000-of-00001.parquet"
    )
    with pytest.raises(DataNotFoundError, match=r"\['sentence1', 'sentence2'\] missing"):
        load_glue("rte", tmp_path)


def test_unknown_string_label_is_named(tmp_path: Path) -> None:
    _write_tsv(
        tmp_path / "rte" / "dev.tsv",
        ["index", "sentence1", "sentence2", "label"],
        [["0", "a", "b", "entailment"], ["1", "c", "d", "maybe"]],
    )
    with pytest.raises(ValueError, match="'maybe'"):
        load_glue("rte", tmp_path)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"dev_split_fraction": 0.0}, "dev_split_fraction.*0.0"),
        ({"dev_split_fraction": 1.5}, "dev_split_fraction.*1.5"),
        ({"max_train_examples": 0}, "max_train_examples.*0"),
        ({"max_eval_examples": -5}, "max_eval_examples.*-5"),
        ({"max_train_examples": 2.5}, "max_train_examples.*2.5"),
        ({"source": "ftp"}, "'ftp'"),
    ],
)
def test_bad_arguments_are_named(glue_dir: Path, kwargs: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        load_glue("rte", glue_dir, **kwargs)


def test_hub_source_conflicts_with_data_dir(glue_dir: Path) -> None:
    with pytest.raises(ValueError, match="conflicts"):
        load_glue("rte", glue_dir, source="hub")


def test_summary_shows_notes(local: dict[str, GlueData]) -> None:
    text = local["qqp"].summary()
    assert "local-parquet" in text and "32,344" in text and "note: qqp has no local train split" in text
