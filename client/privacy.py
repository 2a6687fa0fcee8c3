"""The client's own privacy guard: it does not have to trust the server.

Each client keeps, in its own state folder on its own machine:

* ``ledger.json``: its privacy ledger; a round's spend is recorded *before* the update is sent;
* ``calibration.json``: the certified noise multiplier for its plan (``rounds x steps`` at rate ``q``),
  calibrated once so that its epsilon over all planned rounds meets its budget;
* ``updates/round-N.npz``: the update it sent for round ``N``. If the server asks for a round the
  client has already paid for (e.g. after a server restart), the client re-sends that update: a
  re-sent output is post-processing and costs no privacy, while training again would.

A client refuses to train past its budget whatever the server asks.
"""

from __future__ import annotations

import io
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedtune.io import atomic_write_bytes, atomic_write_json, read_json
from fedtune.privacy.calibration import Calibration, calibrate_noise, certifier
from fedtune.privacy.events import SubsampledGaussianEvent
from fedtune.privacy.ledger import BudgetCheck, PrivacyLedger

__all__ = ["ClientPrivacy", "Plan"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Plan:
    """A client's training plan: Poisson rate ``q``, steps per round, planned rounds."""

    sampling_rate: float
    steps_per_round: int
    rounds: int

    @property
    def total_steps(self) -> int:
        return self.steps_per_round * self.rounds


class ClientPrivacy:
    """Budget, calibration, ledger and paid-for updates of one client.

    Parameters
    ----------
    client_id : str
        The client's identifier (also its ledger key).
    state_dir : Path
        Folder on the client's machine holding its ledger, calibration and updates.
    epsilon, delta : float
        The client's record-level budget over all rounds (``epsilon = inf``: no DP).
    accountant : str
        Estimating accountant used to calibrate (certified with ``pld`` afterwards).
    """

    def __init__(
        self, client_id: str, state_dir: str | Path, epsilon: float, delta: float, accountant: str = "saddlepoint"
    ) -> None:
        self.client_id = client_id
        self.state_dir = Path(state_dir)
        self.epsilon = epsilon
        self.delta = delta
        self.accountant = accountant
        self.ledger = PrivacyLedger.open(self.state_dir / "ledger.json", delta, epsilon, accountant)

    @property
    def private(self) -> bool:
        return not math.isinf(self.epsilon)

    def calibrate(self, plan: Plan) -> Calibration:
        """The certified calibration for ``plan`` (computed once, then read back from disk)."""
        path = self.state_dir / "calibration.json"
        key = {"plan": plan.__dict__, "epsilon": self.epsilon, "delta": self.delta, "accountant": self.accountant}
        if path.exists():
            stored = read_json(path)
            if stored.get("key") == json.loads(json.dumps(key)):
                return Calibration(**stored["calibration"])
        calibration = calibrate_noise(
            self.epsilon, self.delta, plan.sampling_rate, plan.total_steps, accountant=self.accountant
        )
        atomic_write_json(path, {"key": key, "calibration": calibration.to_dict()})
        log.info(
            "client %s: sigma %.4f for epsilon %g over %d steps at q = %.4g (certified epsilon %.4f)",
            self.client_id,
            calibration.sigma,
            self.epsilon,
            plan.total_steps,
            plan.sampling_rate,
            calibration.certified_epsilon,
        )
        return calibration

    def paid_for(self, server_round: int) -> bool:
        """Whether this round's spend is already in the client's ledger."""
        return server_round in self.ledger.rounds(self.client_id)

    def paid_event(self, server_round: int) -> SubsampledGaussianEvent | None:
        """The event recorded for ``server_round``, or None if the round is not paid for."""
        return next((e.event for e in self.ledger if e.client_id == self.client_id and e.round == server_round), None)

    def check_noise(self, plan: Plan, sigma: float) -> BudgetCheck:
        """Would training all of ``plan`` with a noise multiplier ``sigma`` (e.g. one the server asks for)
        keep this client within its budget? Checked with the certified (``pld``) bound."""
        if not (math.isfinite(sigma) and sigma > 0):
            return BudgetCheck(
                False, math.inf, self.epsilon, f"noise multiplier {sigma!r} is not a positive finite number"
            )
        planned = SubsampledGaussianEvent(plan.sampling_rate, sigma, plan.total_steps)
        after = certifier().get_epsilon(planned, self.delta)
        if after > self.epsilon:
            return BudgetCheck(
                False,
                after,
                self.epsilon,
                (
                    f"noise multiplier {sigma:g} over {plan.rounds} rounds x {plan.steps_per_round} steps "
                    f"at q = {plan.sampling_rate:.4g} "
                    f"gives epsilon {after:.4g} (certified, delta {self.delta:g}) "
                    f"> this client's budget {self.epsilon:g}"
                ),
            )
        return BudgetCheck(True, after, self.epsilon)

    def admit(self, event: SubsampledGaussianEvent) -> BudgetCheck:
        """Prospective check of a new round against the budget (certified bound)."""
        return self.ledger.check(self.client_id, event)

    def record(
        self, server_round: int, event: SubsampledGaussianEvent, examples: int, update: dict[str, np.ndarray]
    ) -> None:
        """Persist the update, then the spend, before anything is sent."""
        buffer = io.BytesIO()
        arrays: dict[str, Any] = update  # Any: numpy's stub matches **arrays to allow_pickle: bool
        np.savez(buffer, **arrays)
        atomic_write_bytes(self.state_dir / "updates" / f"round-{server_round}.npz", buffer.getvalue())
        self.ledger.record(self.client_id, server_round, event, examples)

    def paid_update(self, server_round: int) -> dict[str, np.ndarray] | None:
        """The update already sent for ``server_round``, if the client still has it."""
        path = self.state_dir / "updates" / f"round-{server_round}.npz"
        if not path.exists():
            return None
        with np.load(path) as data:
            return {key: data[key] for key in data.files}
