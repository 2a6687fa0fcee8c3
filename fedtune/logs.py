"""Logging: fedtune's own lines by default, everything else with ``-v``.

A run prints what a user needs (settings, one line per client and round, the summary). Libraries
are quiet unless ``-v``: alembic's migration INFO lines (Flower's state database), Flower's DEBUG
lines and deprecation notices, and the FutureWarning/DeprecationWarning chatter of transformers,
datasets and Ray. Ray worker processes inherit the environment variables set here.
"""

from __future__ import annotations

import logging
import os
import warnings

__all__ = ["configure_logging", "setup_cli_logging", "QUIET_LOGGERS"]

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

#: Library loggers raised to WARNING (ERROR for the noisiest) unless ``-v``.
QUIET_LOGGERS: dict[str, int] = {
    "alembic": logging.WARNING,
    "flwr": logging.ERROR,  # its deprecation notices and fraction_evaluate warning
    "ray": logging.WARNING,
    "httpx": logging.WARNING,
    "urllib3": logging.WARNING,
    "filelock": logging.WARNING,
    "datasets": logging.ERROR,
    "transformers": logging.ERROR,
    "huggingface_hub": logging.ERROR,
    "opacus": logging.WARNING,
    "matplotlib": logging.WARNING,
}


def configure_logging() -> None:
    """Show fedtune's INFO messages in a deployed app's output (Flower configures only its own logger).

    Only the ``fedtune`` logger gets a handler, and only when the root logger has none (so nothing is
    printed twice). Propagation is left on, so handlers installed by the host (pytest's log capture,
    an application's logging setup) still see fedtune's records.
    """
    logger = logging.getLogger("fedtune")
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(_FORMAT))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def setup_cli_logging(verbose: bool = False) -> None:
    """Logging for the ``fedtune`` command: INFO from fedtune, warnings from libraries; ``verbose``: all DEBUG."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format=_FORMAT)
    if verbose:
        return
    for name, level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    # Flower installs its own handler on the "flwr" logger at import time; keep it at ERROR as well.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning,ignore::DeprecationWarning")  # Ray workers
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*fraction_evaluate.*")
