"""The ``fedtune`` command: one entry point; each part of the product registers its own sub-commands.

===========================  ===================================================  ==========================
sub-commands                 what                                                 registered by
===========================  ===================================================  ==========================
simulate, centralized,       experiments on Flower's simulation engine (Ray)      ``fedtune.simulations.cli``
compare
audit                        an empirical privacy audit of a simulate run         ``fedtune.simulations.audit``
server, certs                the server side of a networked deployment            ``fedtune.server.cli``
client, keys, partition      the client side of a networked deployment            ``fedtune.client.cli``
privacy                      calibrate, account, read ledgers                     ``fedtune.privacy.cli``
===========================  ===================================================  ==========================

This module is the one place that knows every part; the parts know only the core (``fedtune.*``).
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence

from fedtune import __version__
from fedtune.errors import RunFailed

__all__ = ["main", "build_parser", "COMMAND_MODULES"]

#: Modules whose ``add_parsers(subparsers)`` registers sub-commands, in ``--help`` order.
COMMAND_MODULES: tuple[str, ...] = (
    "fedtune.simulations.cli",
    "fedtune.simulations.audit",
    "fedtune.server.cli",
    "fedtune.client.cli",
    "fedtune.privacy.cli",
)


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser."""
    parser = argparse.ArgumentParser(
        prog="fedtune", description="Federated DP fine-tuning with honest privacy accounting."
    )
    parser.add_argument("--version", action="version", version=f"fedtune {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="show every library's log lines and warnings (debug)"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``fedtune`` command.

    Exit status: 0 done; 1 the run failed (:class:`RunFailed`, one message); 2 bad input (one line
    naming the value and what is allowed); 130 interrupted (Ctrl-C: finished work is kept).
    """
    from fedtune.logs import setup_cli_logging

    parser = build_parser()
    args = parser.parse_args(argv)
    setup_cli_logging(verbose=args.verbose)
    try:
        return int(args.handler(args) or 0)
    except (ValueError, TypeError, OSError) as err:
        if args.verbose:
            raise
        print(f"fedtune: error: {_describe(err)}", file=sys.stderr)
        return 2
    except RunFailed as err:
        print(f"fedtune: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the message short
        out = getattr(args, "out", None) if not getattr(args, "resume", None) else args.resume
        hint = (
            f"; finished rounds are kept: `fedtune {args.command} --resume {out}` continues"
            if out and args.command in ("simulate", "centralized", "compare", "audit")
            else ""
        )
        print(f"fedtune: interrupted{hint}", file=sys.stderr)
        if previous is not None:
            signal.signal(signal.SIGINT, previous)  # in-process callers get their handler back
        return 130


def _describe(err: BaseException) -> str:
    """One line for an error: OS errors as 'what: path', not errno tuples."""
    if isinstance(err, OSError) and err.filename is not None:
        reason = {
            IsADirectoryError: "is a folder, expected a file",
            NotADirectoryError: "is not a folder",
            FileNotFoundError: "no such file or folder",
            PermissionError: "permission denied",
        }.get(type(err), err.strerror)
        return f"{err.filename}: {reason}"
    return str(err)


def entry() -> None:
    """The console script: :func:`main`, and after Ctrl-C no wait for threads that cannot end.

    Flower's simulation engine leaves worker threads blocked on Ray results of a run that was
    interrupted, and Python would wait for them forever at exit. Everything fedtune writes is
    atomic and already on disk by then, so the process ends without them.
    """
    code = main()
    if code == 130:
        _exit_if_threads_linger(code)
    sys.exit(code)


def _exit_if_threads_linger(code: int, grace: float = 3.0) -> None:
    deadline = time.monotonic() + grace
    others = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
    for thread in others:
        thread.join(max(0.0, deadline - time.monotonic()))
    if any(thread.is_alive() for thread in others):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    entry()
