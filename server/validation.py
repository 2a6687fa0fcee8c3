"""Checks on client updates before aggregation: wrong keys, wrong shapes or non-finite values are rejected."""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord

__all__ = ["InvalidUpdate", "validate_update"]


class InvalidUpdate(ValueError):
    """A client's update cannot be aggregated; the message names the offending key."""


def validate_update(update: ArrayRecord, reference: ArrayRecord) -> None:
    """Check that ``update`` has exactly ``reference``'s keys, shapes and dtypes, with finite values.

    Parameters
    ----------
    update : ArrayRecord
        Arrays sent by a client (adapter and head weights).
    reference : ArrayRecord
        The global arrays sent to the client this round.

    Raises
    ------
    InvalidUpdate
        Naming the first missing, unexpected, mis-shaped or non-finite key.
    """
    expected, got = set(reference.keys()), set(update.keys())
    if missing := sorted(expected - got):
        raise InvalidUpdate(f"update is missing {len(missing)} key(s), e.g. {missing[0]!r}")
    if extra := sorted(got - expected):
        raise InvalidUpdate(f"update has {len(extra)} unexpected key(s), e.g. {extra[0]!r}")
    for key in reference.keys():
        ref, arr = reference[key], update[key]
        if tuple(arr.shape) != tuple(ref.shape):
            raise InvalidUpdate(f"update key {key!r} has shape {tuple(arr.shape)}, expected {tuple(ref.shape)}")
        values = arr.numpy()
        if values.dtype.kind != "f":
            raise InvalidUpdate(f"update key {key!r} has dtype {values.dtype}, expected a float array")
        if not np.all(np.isfinite(values)):
            raise InvalidUpdate(f"update key {key!r} holds non-finite values (nan or inf)")
