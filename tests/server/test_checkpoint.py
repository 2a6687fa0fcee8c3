"""Checkpoints are atomic: a crash while saving leaves the previous checkpoint loadable."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedtune.server import checkpoint as ckpt
from fedtune.server.checkpoint import Checkpoint, load_checkpoint, save_checkpoint


def make(round_: int) -> Checkpoint:
    return Checkpoint(
        round_,
        {"a": np.full((2, 2), float(round_), np.float32)},
        [{"round": round_, "accuracy": 0.5 + round_ / 10}],
        {"task": "sst2"},
    )


def test_save_and_load(tmp_path: Path) -> None:
    assert load_checkpoint(tmp_path) is None
    save_checkpoint(tmp_path, make(1))
    save_checkpoint(tmp_path, make(2))
    loaded = load_checkpoint(tmp_path)
    assert loaded is not None and loaded.round == 2
    np.testing.assert_array_equal(loaded.arrays["a"], np.full((2, 2), 2.0, np.float32))
    assert [p.name for p in tmp_path.glob("arrays-*.npz")] == ["arrays-r0002.npz"]  # older arrays pruned
    assert not list(tmp_path.glob("*.tmp"))


def test_crash_while_committing_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    save_checkpoint(tmp_path, make(1))

    def crash(path: object, data: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "atomic_write_json", crash)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, make(2))
    loaded = load_checkpoint(tmp_path)
    assert loaded is not None and loaded.round == 1
    np.testing.assert_array_equal(loaded.arrays["a"], np.full((2, 2), 1.0, np.float32))


def test_wrong_schema_is_refused(tmp_path: Path) -> None:
    (tmp_path / "state.json").write_text('{"schema": "other"}')
    with pytest.raises(ValueError, match="not a fedtune checkpoint"):
        load_checkpoint(tmp_path)
