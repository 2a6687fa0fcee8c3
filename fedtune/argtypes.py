"""Argument types shared by the ``fedtune`` sub-commands (argparse turns their errors into exit 2)."""

from __future__ import annotations

import argparse
import math

__all__ = ["epsilon_arg", "optional_int_arg"]


def epsilon_arg(text: str) -> float:
    """An epsilon budget: a number > 0, or ``inf`` (no DP)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"epsilon must be a number > 0 or 'inf', got {text!r}") from None
    if math.isnan(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"epsilon must be > 0 or 'inf', got {text!r}")
    return value


def optional_int_arg(text: str) -> int | None:
    """An integer, or ``none`` / ``all`` / empty for no limit."""
    if text.lower() in ("", "none", "all"):
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'all', got {text!r}") from None
