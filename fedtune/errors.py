"""Errors a run reports to the user as one message (the ``fedtune`` command exits with status 1)."""

from __future__ import annotations

__all__ = ["RunFailed"]


class RunFailed(RuntimeError):
    """A run could not finish for a reason outside the user's input (a client out of memory, ...).

    The message says what happened and what to change. Finished rounds are kept.
    """
