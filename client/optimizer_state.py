"""A client's state between rounds, kept on the client: its optimizer state and its SCAFFOLD variate.

With ``stateful_clients`` a client continues its optimizer (SGD momentum, Adam's moments and step
count) from one round to the next instead of starting fresh. The state lives in the client's own
state folder, next to its privacy ledger: ``OUT/clients/client-ID/optimizer.pt`` in a simulation,
the ``--state-dir`` of a deployed client. It is written atomically after each round it trains, so
a crash, Ctrl-C or a resumed run continues from the last round the client finished.

The optimizer state is a function of the client's privatized gradients only (post-processing), so
keeping it costs no privacy; it never leaves the client.

Format (``fedtune.optimizer-state/1``): a ``torch.save`` of ``{"format", "round", "state",
"previous"}`` where ``state`` is the optimizer's ``state_dict()`` after ``round`` and ``previous``
the same for the latest earlier round (or None); it loads with ``weights_only=True``. Fields
are only added; a reader refuses a format it does not know with a ValueError naming it.

With ``scaffold`` the client also keeps its control variate in ``control.pt``
(``fedtune.control-variate/1``, the same layout, :class:`ControlVariateStore`). Unlike the
optimizer state the variate is sent to the server each round (it is post-processing of the
noised gradients, so that costs no privacy either).
"""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any

from fedtune.io import atomic_write_bytes

__all__ = ["FORMAT", "CONTROL_FORMAT", "RoundStateStore", "OptimizerStateStore", "ControlVariateStore"]

log = logging.getLogger(__name__)

FORMAT = "fedtune.optimizer-state/1"
#: Format of a SCAFFOLD client's control variate (``control.pt``): the same layout, with ``state``
#: mapping each trainable parameter's name to the client's mean privatized gradient of that round.
CONTROL_FORMAT = "fedtune.control-variate/1"


class RoundStateStore:
    """Load and save one client's per-round state in ``folder/FILENAME`` (the latest round and the one before)."""

    FILENAME = "state.pt"
    FORMAT = "fedtune.round-state/1"
    WHAT = "round state"

    def __init__(self, folder: str | Path) -> None:
        self.path = Path(folder) / self.FILENAME

    def _read(self) -> dict[str, Any] | None:
        import torch

        if not self.path.is_file():
            return None
        try:
            data = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any unpickling error means the same thing here
            raise ValueError(f"cannot read the {self.WHAT} {self.path}: {err}") from None
        if not isinstance(data, dict) or data.get("format") != self.FORMAT:
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"{self.path} is not a fedtune {self.WHAT} (format {found!r}, expected {self.FORMAT!r})")
        for entry in (data, data.get("previous")):
            if entry is None:
                continue
            server_round, state = entry.get("round"), entry.get("state")
            if isinstance(server_round, bool) or not isinstance(server_round, int) or not isinstance(state, dict):
                raise ValueError(
                    f"{self.path} is a damaged fedtune {self.WHAT}: round {server_round!r}, "
                    f"state of type {type(state).__name__}"
                )
        return data

    def load(self, before_round: int | None = None) -> tuple[int, dict[str, Any]] | None:
        """``(round, state)`` of the latest round before ``before_round`` (None: the latest saved).

        A round trained again (a resumed non-private run re-trains the round it was interrupted in)
        continues from the state *before* that round, kept as ``previous``, so no round's
        gradients enter the optimizer twice. None if the client has no such state yet.

        Raises
        ------
        ValueError
            If the file is unreadable or of an unknown format (it is left in place).
        """
        data = self._read()
        if data is None:
            return None
        for entry in (data, data.get("previous")):
            if entry is not None and (before_round is None or entry["round"] < before_round):
                return entry["round"], entry["state"]
        return None

    def at(self, server_round: int) -> dict[str, Any] | None:
        """The state saved for exactly ``server_round`` (the latest or the one before), else None.

        Raises
        ------
        ValueError
            If the file is unreadable or of an unknown format.
        """
        data = self._read()
        for entry in (data, None if data is None else data.get("previous")):
            if entry is not None and entry["round"] == server_round:
                return dict(entry["state"])
        return None

    def save(self, server_round: int, state: dict[str, Any]) -> None:
        """Atomically store the state after ``server_round``, keeping the latest earlier round's as ``previous``."""
        import torch

        try:
            data = self._read()
        except ValueError:  # a damaged file is replaced (run_job refuses to train on one before this)
            data = None
        previous = None
        if data is not None:
            if data["round"] < server_round:
                previous = {"round": data["round"], "state": data["state"]}
            elif data.get("previous") is not None and data["previous"]["round"] < server_round:
                previous = data["previous"]
        buffer = io.BytesIO()
        torch.save({"format": self.FORMAT, "round": int(server_round), "state": state, "previous": previous}, buffer)
        atomic_write_bytes(self.path, buffer.getvalue())
        log.debug("%s after round %d saved to %s", self.WHAT, server_round, self.path)


class OptimizerStateStore(RoundStateStore):
    """One client's optimizer state in ``folder/optimizer.pt`` (format :data:`FORMAT`)."""

    FILENAME = "optimizer.pt"
    FORMAT = FORMAT
    WHAT = "optimizer state"


class ControlVariateStore(RoundStateStore):
    """A SCAFFOLD client's control variate ``c_k`` in ``folder/control.pt`` (format :data:`CONTROL_FORMAT`).

    ``c_k`` after round r is the client's mean privatized gradient over that round's steps
    (:attr:`fedtune.train.TrainResult.mean_gradient`): a function of the noised gradients only, so
    keeping it and sending it to the server costs no privacy. Like the optimizer state it is saved
    only after the round's spend is recorded, and a round trained again continues from the variate
    of the round before.
    """

    FILENAME = "control.pt"
    FORMAT = CONTROL_FORMAT
    WHAT = "control variate"
