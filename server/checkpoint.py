"""Round checkpoints, written atomically: the global adapter, the metrics so far and the config.

Layout of ``DIR/checkpoint/``: ``arrays-rNNNN.npz`` (the global trainable weights after round N) and
``state.json`` (the commit point: it names the arrays file). The arrays are written first, then
``state.json`` is replaced atomically, then older arrays files are removed, so a crash at any moment
leaves a consistent checkpoint. The privacy ledger is written by the ledger itself before a round's
event counts.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedtune.io import atomic_write_bytes, atomic_write_json, read_json

__all__ = ["Checkpoint", "save_checkpoint", "load_checkpoint"]

_SCHEMA = "fedtune.checkpoint/1"


@dataclass(frozen=True)
class Checkpoint:
    """The state after ``round``: ``arrays`` (name -> array), per-round ``metrics``, run ``config``."""

    round: int
    arrays: dict[str, np.ndarray]
    metrics: list[dict[str, Any]]
    config: dict[str, Any]


def save_checkpoint(folder: str | Path, checkpoint: Checkpoint) -> Path:
    """Write ``checkpoint`` under ``folder`` atomically; returns the state file."""
    folder = Path(folder)
    buffer = io.BytesIO()
    arrays: dict[str, Any] = checkpoint.arrays  # Any: numpy's stub matches **arrays to allow_pickle: bool
    np.savez(buffer, **arrays)
    name = f"arrays-r{checkpoint.round:04d}.npz"
    atomic_write_bytes(folder / name, buffer.getvalue())
    state = atomic_write_json(
        folder / "state.json",
        {
            "schema": _SCHEMA,
            "round": checkpoint.round,
            "arrays": name,
            "metrics": checkpoint.metrics,
            "config": checkpoint.config,
        },
    )
    for old in folder.glob("arrays-r*.npz"):
        if old.name != name:
            old.unlink(missing_ok=True)
    return state


def load_checkpoint(folder: str | Path) -> Checkpoint | None:
    """The last committed checkpoint under ``folder``, or None if there is none."""
    state_file = Path(folder) / "state.json"
    if not state_file.exists():
        return None
    state = read_json(state_file)
    if state.get("schema") != _SCHEMA:
        raise ValueError(f"{state_file} is not a fedtune checkpoint (schema {_SCHEMA!r} expected)")
    with np.load(Path(folder) / state["arrays"]) as data:
        arrays = {key: data[key] for key in data.files}
    return Checkpoint(int(state["round"]), arrays, list(state["metrics"]), dict(state["config"]))
