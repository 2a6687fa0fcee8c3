"""Round checkpoints, written atomically: the global adapter, the server optimizer, the metrics and the config.

Layout of ``DIR/checkpoint/``:

``arrays-rNNNN.npz``
    The global trainable weights after round N.
``server-optimizer-rNNNN.npz``
    The server optimizer's state after round N (:func:`fedtune.server.optimizers.strategy_state`):
    one entry ``SLOT/NAME`` per array, e.g. ``m_t/classifier.weight``. Only written when there is
    state (FedAvgM, FedAdam, FedYogi after their first round; never for FedAvg).
``state.json``
    The commit point: it names the files above (``"arrays"``, and ``"server_optimizer"`` when there is one).

The array files are written first, then ``state.json`` is replaced atomically, then files it no
longer names are removed, so a crash at any moment leaves a consistent checkpoint. The privacy
ledger is written by the ledger itself before a round's event counts.

Compatibility: the schema stays ``fedtune.checkpoint/1`` and fields are only ever added. Every
checkpoint written by an earlier version loads: one without ``"server_optimizer"`` (all checkpoints before
server optimizers were saved) loads with an empty :attr:`Checkpoint.server_optimizer`, and the run
resumes with a fresh server optimizer (exactly right for FedAvg, which keeps no state). An
earlier version reading a newer checkpoint ignores the server optimizer file.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedtune.io import atomic_write_bytes, atomic_write_json, read_json

__all__ = ["Checkpoint", "save_checkpoint", "load_checkpoint"]

_SCHEMA = "fedtune.checkpoint/1"
_SEPARATOR = "/"  # between the slot and the array name in server-optimizer-rNNNN.npz (slots hold no "/")


@dataclass(frozen=True)
class Checkpoint:
    """The state after ``round``: ``arrays`` (name -> array), per-round ``metrics``, run ``config``, and
    ``server_optimizer``, the server optimizer's state (slot -> name -> array; empty for FedAvg)."""

    round: int
    arrays: dict[str, np.ndarray]
    metrics: list[dict[str, Any]]
    config: dict[str, Any]
    server_optimizer: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)


def _npz(arrays: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # Any: numpy's stub matches **arrays to allow_pickle: bool
    return buffer.getvalue()


def save_checkpoint(folder: str | Path, checkpoint: Checkpoint) -> Path:
    """Write ``checkpoint`` under ``folder`` atomically; returns the state file."""
    folder = Path(folder)
    name = f"arrays-r{checkpoint.round:04d}.npz"
    atomic_write_bytes(folder / name, _npz(dict(checkpoint.arrays)))
    state: dict[str, Any] = {"schema": _SCHEMA, "round": checkpoint.round, "arrays": name}
    keep = {name}
    if checkpoint.server_optimizer:
        flat: dict[str, Any] = {}
        for slot, arrays in checkpoint.server_optimizer.items():
            if _SEPARATOR in slot:
                raise ValueError(f"server optimizer slot names cannot hold {_SEPARATOR!r}: {slot!r}")
            flat.update({f"{slot}{_SEPARATOR}{key}": value for key, value in arrays.items()})
        state["server_optimizer"] = f"server-optimizer-r{checkpoint.round:04d}.npz"
        atomic_write_bytes(folder / state["server_optimizer"], _npz(flat))
        keep.add(state["server_optimizer"])
    state.update(metrics=checkpoint.metrics, config=checkpoint.config)
    committed = atomic_write_json(folder / "state.json", state)
    for pattern in ("arrays-r*.npz", "server-optimizer-r*.npz"):
        for old in folder.glob(pattern):
            if old.name not in keep:
                old.unlink(missing_ok=True)
    return committed


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
    optimizer: dict[str, dict[str, np.ndarray]] = {}
    if state.get("server_optimizer"):
        with np.load(Path(folder) / state["server_optimizer"]) as data:
            for entry in data.files:
                slot, _, key = entry.partition(_SEPARATOR)
                optimizer.setdefault(slot, {})[key] = data[entry]
    return Checkpoint(int(state["round"]), arrays, list(state["metrics"]), dict(state["config"]), optimizer)
