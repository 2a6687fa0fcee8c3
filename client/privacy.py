"""The client's own privacy guard: it does not have to trust the server.

Each client keeps, in its own state folder on its own machine:

* ``ledger.json``: its privacy ledger; a round's spend is recorded *before* the update is sent;
* ``calibration.json``: the certified noise multiplier for its plan (``rounds x steps`` at rate ``q``),
  calibrated once so that its epsilon over all planned rounds meets its budget;
* ``updates/round-N.npz``: the update it sent for round ``N``. If the server asks for a round the
  client has already paid for (e.g. after a server restart), the client re-sends that update: a
  re-sent output is post-processing and costs no privacy, while training again would;
* ``label_counts.json`` (format ``fedtune.label-counts/1``): with logit adjustment under DP, its label
  counts released once with Gaussian noise, recorded in the ledger as round 0 and read back ever after.

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
from fedtune.privacy.events import Composition, SubsampledGaussianEvent
from fedtune.privacy.ledger import RELEASE_ROUND, BudgetCheck, PrivacyLedger

__all__ = ["LABEL_COUNTS_FORMAT", "ClientPrivacy", "Plan"]

log = logging.getLogger(__name__)


#: Format tag of ``label_counts.json`` (compatibility: later versions keep reading ``/1``).
LABEL_COUNTS_FORMAT = "fedtune.label-counts/1"


@dataclass(frozen=True)
class Plan:
    """A client's training plan: Poisson rate ``q``, steps per round, planned rounds, and the one-off
    releases it makes besides (the label counts of logit adjustment), composed with the rounds."""

    sampling_rate: float
    steps_per_round: int
    rounds: int
    releases: tuple[SubsampledGaussianEvent, ...] = ()

    @property
    def total_steps(self) -> int:
        return self.steps_per_round * self.rounds

    def key(self) -> dict[str, Any]:
        """JSON-ready identity of the plan (the calibration cache's key)."""
        key: dict[str, Any] = {
            "sampling_rate": self.sampling_rate,
            "steps_per_round": self.steps_per_round,
            "rounds": self.rounds,
        }
        if self.releases:
            key["releases"] = [event.to_dict() for event in self.releases]
        return key

    def composition(self, sigma: float) -> Composition:
        """The releases and all planned rounds at noise multiplier ``sigma``."""
        return Composition((*self.releases, SubsampledGaussianEvent(self.sampling_rate, sigma, self.total_steps)))


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
        key = {"plan": plan.key(), "epsilon": self.epsilon, "delta": self.delta, "accountant": self.accountant}
        if path.exists():
            stored = read_json(path)
            if stored.get("key") == json.loads(json.dumps(key)):
                return Calibration(**stored["calibration"])
        calibration = calibrate_noise(
            self.epsilon,
            self.delta,
            plan.sampling_rate,
            plan.total_steps,
            accountant=self.accountant,
            spent=Composition(plan.releases) if plan.releases else None,
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

    def released_event(self) -> SubsampledGaussianEvent | None:
        """The client's one-off release (its label counts) in its ledger, or None."""
        return next(
            (e.event for e in self.ledger if e.client_id == self.client_id and e.kind == "release"),
            None,
        )

    def check_noise(self, plan: Plan, sigma: float) -> BudgetCheck:
        """Would training all of ``plan`` with a noise multiplier ``sigma`` (e.g. one the server asks for)
        keep this client within its budget? Checked with the certified (``pld``) bound."""
        if not (math.isfinite(sigma) and sigma > 0):
            return BudgetCheck(
                False, math.inf, self.epsilon, f"noise multiplier {sigma!r} is not a positive finite number"
            )
        after = certifier().get_epsilon(plan.composition(sigma), self.delta)
        if after > self.epsilon:
            return BudgetCheck(
                False,
                after,
                self.epsilon,
                (
                    f"noise multiplier {sigma:g} over {plan.rounds} rounds x {plan.steps_per_round} steps "
                    f"at q = {plan.sampling_rate:.4g}{' with its label-count release' if plan.releases else ''} "
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

    def release_label_counts(
        self, counts: np.ndarray, noise_multiplier: float, examples: int, rng: np.random.Generator
    ) -> tuple[np.ndarray, SubsampledGaussianEvent] | str:
        r"""The client's label counts released once with the Gaussian mechanism, or why it refuses.

        Adding or removing one example changes one count by 1 (L2 sensitivity 1), so adding
        :math:`N(0, \sigma_h^2)` to every count is the Gaussian mechanism, the event
        ``SubsampledGaussianEvent(1, sigma_h, 1)`` (Dwork and Roth 2014, Sec. A; Mironov 2017). The
        noisy counts are written to ``label_counts.json`` first, then the event to the ledger as
        round :data:`~fedtune.privacy.ledger.RELEASE_ROUND`; later calls read them back and spend
        nothing (a crash between the two records the event on the next call). If the ledger holds
        the release but the file is gone, the client refuses: releasing again would spend twice.

        Parameters
        ----------
        counts : numpy.ndarray
            The exact count of each label in the client's shard.
        noise_multiplier : float
            ``sigma_h > 0`` (used for the first release only; afterwards the stored one holds).
        examples : int
            The shard's size, for the ledger.
        rng : numpy.random.Generator
            The noise's randomness (fresh OS entropy unless the run is ``dp_randomness = seeded``).

        Returns
        -------
        (noisy counts, event), or the reason to refuse.
        """
        path = self.state_dir / "label_counts.json"
        recorded = self.released_event()
        if path.exists():
            try:
                stored = read_json(path)
                if stored.get("format") != LABEL_COUNTS_FORMAT:
                    raise ValueError(f"format {stored.get('format')!r}, expected {LABEL_COUNTS_FORMAT!r}")
                noisy = np.asarray(stored["counts"], dtype=np.float64)
                event = SubsampledGaussianEvent(1.0, float(stored["noise_multiplier"]), 1)
            except (ValueError, KeyError, TypeError) as err:
                return f"the released label counts in {path} are unreadable ({err}); releasing again would spend twice"
            if noisy.shape != counts.shape or not np.isfinite(noisy).all():
                return f"the released label counts in {path} do not fit this task's {counts.size} labels"
            if recorded is None:  # written, then interrupted before the ledger: record it now
                self.ledger.record(self.client_id, RELEASE_ROUND, event, examples, kind="release")
            elif recorded != event:
                return f"{path} and the ledger's round {RELEASE_ROUND} disagree on the release ({event} vs {recorded})"
            return noisy, event
        if recorded is not None:
            return (
                f"the label counts were released (ledger round {RELEASE_ROUND}) but {path} is missing; "
                "refusing to release them again"
            )
        event = SubsampledGaussianEvent(1.0, noise_multiplier, 1)
        verdict = self.admit(event)
        if not verdict.allowed:
            return f"releasing the label counts: {verdict.reason}"
        noisy = counts.astype(np.float64) + rng.normal(0.0, noise_multiplier, size=counts.shape)
        atomic_write_json(
            path, {"format": LABEL_COUNTS_FORMAT, "noise_multiplier": noise_multiplier, "counts": noisy.tolist()}
        )
        self.ledger.record(self.client_id, RELEASE_ROUND, event, examples, kind="release")
        log.info("client %s: released its label counts once with noise multiplier %g", self.client_id, noise_multiplier)
        return noisy, event

    def paid_update(self, server_round: int) -> dict[str, np.ndarray] | None:
        """The update already sent for ``server_round``, if the client still has it."""
        path = self.state_dir / "updates" / f"round-{server_round}.npz"
        if not path.exists():
            return None
        with np.load(path) as data:
            return {key: data[key] for key in data.files}
