"""Progress of local training, for a person at a terminal and for logs.

On a terminal (stderr is a TTY) :class:`TrainingProgress` draws a tqdm bar: logical steps done
and planned, examples per second, padding efficiency (real / computed tokens), ETA, and the
client's certified epsilon. Elsewhere (a Ray actor, CI, a log file) it writes one log line per
round when training ends, and one every ``log_seconds`` during a long round.

The epsilon shown is never a guess: ``epsilon_before`` is the certified (``pld``) bound of the
rounds already recorded in the client's ledger, and ``epsilon_after`` the certified bound once
this round is recorded (the noise of every step of the round is already fixed by then).
"""

from __future__ import annotations

import logging
import math
import sys
import time
from typing import Any

from fedtune.train import StepProgress

__all__ = ["TrainingProgress", "format_rate_line"]

log = logging.getLogger("fedtune.progress")


def _eps(value: float | None) -> str:
    if value is None:
        return "n/a"
    return "inf" if math.isinf(value) else f"{value:.3f}"


def format_rate_line(report: StepProgress) -> str:
    """``"40/66 steps, 230 ex/s, padding 87%, ETA 1m52s"`` for a progress report."""
    eta = report.eta_seconds
    eta_text = "-" if not math.isfinite(eta) else f"{int(eta // 60)}m{int(eta % 60):02d}s"
    pad = report.padding_efficiency
    pad_text = "-" if not math.isfinite(pad) else f"{pad:.0%}"
    return (
        f"{report.step}/{report.total_steps} steps, {report.examples_per_second:.0f} ex/s, "
        f"padding efficiency {pad_text}, {report.seconds:.0f}s, ETA {eta_text}"
    )


class TrainingProgress:
    """A ``progress`` callback for :func:`fedtune.train.train_local`.

    Parameters
    ----------
    label : str
        Who trains what, e.g. ``"client 3 round 2"``.
    total_steps : int
        Planned logical steps.
    epsilon_before, epsilon_after : float or None
        Certified epsilon of the client before this round and once it is recorded (None for a
        non-private run).
    terminal : bool or None
        Force the bar on or off (None: a bar if stderr is a TTY).
    log_seconds : float
        Without a bar, log a line at most this often during the round (and always at its end).
    """

    def __init__(
        self,
        label: str,
        total_steps: int,
        *,
        epsilon_before: float | None = None,
        epsilon_after: float | None = None,
        terminal: bool | None = None,
        log_seconds: float = 300.0,
    ) -> None:
        self.label = label
        self.total_steps = total_steps
        self.epsilon_before = epsilon_before
        self.epsilon_after = epsilon_after
        self.log_seconds = log_seconds
        self.last: StepProgress | None = None
        self._last_log = time.monotonic()
        use_bar = sys.stderr.isatty() if terminal is None else terminal
        self._bar: Any = None
        if use_bar:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, desc=label, unit="step", leave=True, dynamic_ncols=True)

    @property
    def epsilon_text(self) -> str:
        if self.epsilon_before is None:
            return "no DP"
        return f"epsilon {_eps(self.epsilon_before)} -> {_eps(self.epsilon_after)} (certified)"

    def __call__(self, report: StepProgress) -> None:
        previous = self.last.step if self.last is not None else 0
        self.last = report
        if self._bar is not None:
            self._bar.update(report.step - previous)
            pad = report.padding_efficiency
            self._bar.set_postfix_str(
                f"{report.examples_per_second:.0f} ex/s, pad {pad:.0%}, {self.epsilon_text}"
                if math.isfinite(pad)
                else f"{report.examples_per_second:.0f} ex/s, {self.epsilon_text}",
                refresh=False,
            )
            return
        now = time.monotonic()
        if report.step < report.total_steps and now - self._last_log >= self.log_seconds:
            self._last_log = now
            log.info("%s: %s, %s", self.label, format_rate_line(report), self.epsilon_text)

    def close(self) -> None:
        """End the bar, or write the round's log line."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.last is not None:
            log.info("%s: %s, %s", self.label, format_rate_line(self.last), self.epsilon_text)

    def __enter__(self) -> TrainingProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
