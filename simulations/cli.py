"""``fedtune simulate``, ``centralized`` and ``compare``: one entry point, experiments as configuration.

``centralized`` is ``simulate`` with one client holding the pooled training data; ``--epsilon inf``
turns DP off; ``compare`` runs a grid of such runs (fedtune.simulations.grid says how cells are matched).
Everything else is shared.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from fedtune.cliargs import add_run_options, config_from_args, run_dir
from fedtune.io import read_json

__all__ = ["add_parsers"]


def _run(args: argparse.Namespace, **overrides: Any) -> int:
    from fedtune.report import format_summary
    from fedtune.simulations.simulate import simulate

    config = config_from_args(args, **overrides)
    summary = simulate(config, resume=bool(args.resume))
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    print(f"\noutputs in {config.out_dir}/: summary.json, metrics.csv, plot.png, ledger.json, checkpoint/, adapter/")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from fedtune.io import jsonable
    from fedtune.simulations.compare import run_grid
    from fedtune.simulations.compare_report import format_results_table
    from fedtune.simulations.grid import GridSpec, parse_epsilons, parse_partitions, parse_seeds

    if args.resume:
        grid_file = Path(run_dir(args.resume, what="fedtune compare grid", marker="grid.json")) / "grid.json"
        spec, out = GridSpec.from_dict(read_json(grid_file)), args.resume
    else:
        epsilons = parse_epsilons(args.epsilons)
        partitions = () if args.partitions.strip().lower() in ("", "none") else parse_partitions(args.partitions)
        seeds = parse_seeds(args.seeds) if args.seeds is not None else (args.seed,)
        base = config_from_args(args, epsilon=8.0, partition="iid")
        spec = GridSpec(
            base,
            epsilons,
            partitions,
            seeds,
            centralized=args.centralized,
            centralized_settings=tuple(args.centralized_set or ()),
        )
        out = args.out
    rows = run_grid(spec, out, resume=bool(args.resume))
    print(json.dumps(jsonable(rows), indent=2) if args.json else "\n" + format_results_table(rows))
    print(
        f"outputs in {out}/: results.csv, results.md, results.json, accuracy_vs_epsilon.png, epsilon_spread.png, cells/"
    )
    return 1 if any(r.get("status") in ("failed", "degraded") for r in rows) else 0


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    """Register ``simulate``, ``centralized`` and ``compare``."""
    sim = subparsers.add_parser("simulate", help="federated DP fine-tuning on Flower's simulation engine (Ray)")
    add_run_options(sim, federated=True)
    sim.set_defaults(handler=_run)
    cen = subparsers.add_parser("centralized", help="the same fine-tuning on the pooled data (one client)")
    add_run_options(cen, federated=False)
    # the one client holding the pooled data gets every CPU of the machine
    cen.set_defaults(
        handler=lambda args: _run(args, clients=1, partition="iid", cpus_per_client=float(os.cpu_count() or 1))
    )
    cmp = subparsers.add_parser(
        "compare", help="centralized vs federated privacy-utility grid (one run per cell, resumable)"
    )
    add_run_options(cmp, federated=True, grid=True)
    cmp.add_argument(
        "--centralized-set",
        action="append",
        metavar="KEY=VALUE",
        help="a setting the centralized cells use instead (repeatable), e.g. --centralized-set batch-size=1024: "
        "each setting gets the batch size, optimizer and learning rate tuned for it; compute stays matched",
    )
    cmp.set_defaults(handler=_compare, out="runs/compare")
