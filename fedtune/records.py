"""Conversions between model weights and Flower's ``ArrayRecord`` (what travels between apps)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

__all__ = ["to_record", "to_state"]


def to_record(state: Mapping[str, Any]) -> ArrayRecord:
    """An ArrayRecord from a state dict of tensors or numpy arrays."""
    return ArrayRecord({
        key: Array(np.ascontiguousarray(value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value))
        for key, value in state.items()
    })


def to_state(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """A state dict of (writable, CPU) tensors from an ArrayRecord."""
    return {key: torch.from_numpy(np.array(record[key].numpy(), copy=True)) for key in record.keys()}
