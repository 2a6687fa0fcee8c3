"""The ``fedtune`` command: one entry point for privacy tools, simulation and experiments."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from fedtune.privacy.cli import add_privacy_parser

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (sub-commands register themselves here)."""
    parser = argparse.ArgumentParser(prog="fedtune", description="Federated DP fine-tuning with honest privacy accounting.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    add_privacy_parser(sub)
    try:
        from fedtune.simulations.cli import add_run_parsers
    except ImportError:  # pragma: no cover - simulations not installed
        pass
    else:
        add_run_parsers(sub)
    from fedtune.deploy_cli import add_deploy_parsers

    add_deploy_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``fedtune`` command; bad input exits with status 2 and a one-line message."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.handler(args) or 0)
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"fedtune: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedtune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
