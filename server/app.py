"""The fedtune ServerApp: ledger-aware FedAvg over LoRA adapters, central evaluation, checkpoints.

Outputs in ``OUT/``: ``config.json``, ``ledger.json`` (the server's privacy ledger), ``checkpoint/``
(after every round, atomic), ``metrics.csv``, ``summary.json``, ``plot.png`` and ``adapter/`` (the
final model in peft's format: ``PeftModel.from_pretrained(base, OUT/adapter)``).
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from fedtune.config import RunConfig
from fedtune.deployment import DeployOptions, configure_logging, split_run_config
from fedtune.io import atomic_write_json
from fedtune.privacy.ledger import PrivacyLedger
from fedtune.records import to_record, to_state
from fedtune.report import plot_rounds, write_metrics_csv, write_summary
from fedtune.server.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from fedtune.server.loop import RoundResult, array_bytes, run_rounds
from fedtune.server.quorum import run_with_quorum
from fedtune.server.strategy import LedgerStrategy
from fedtune.workload import get_workload

__all__ = ["make_server_app", "run_server"]

log = logging.getLogger(__name__)


def run_server(grid: Grid, config: RunConfig, *, resume: bool = False, workload: Any = None,
               deployment: DeployOptions | None = None) -> dict[str, Any]:
    """Run the whole federation for ``config`` on ``grid``; returns the summary (also written to disk).

    ``workload`` defaults to the simulation's shared :class:`~fedtune.workload.Workload`; a deployed
    server passes an :class:`~fedtune.server.eval_workload.EvalWorkload` (no client data) and its
    ``deployment`` options, and then runs the rounds under a quorum
    (:func:`fedtune.server.quorum.run_with_quorum`).
    """
    from fedtune.data import describe_partitions, main_metric
    from fedtune.evaluate import evaluate
    from fedtune.model import get_trainable_state, pick_device, save_adapter, set_trainable_state

    started = time.perf_counter()
    out = config.out_dir
    workload = get_workload(config) if workload is None else workload
    metric = main_metric(workload.data.spec)
    device = pick_device()
    eval_model = workload.new_model()
    checkpoint = load_checkpoint(out / "checkpoint") if resume else None
    if checkpoint is not None:
        arrays, rounds, first = to_record(checkpoint.arrays), list(checkpoint.metrics), checkpoint.round + 1
        earlier_seconds = sum(float(r["seconds"]) for r in rounds)
        log.info("resuming after round %d from %s", checkpoint.round, out / "checkpoint")
    else:
        arrays, rounds, first, earlier_seconds = to_record(get_trainable_state(eval_model)), [], 1, 0.0
    atomic_write_json(out / "config.json", config.to_dict())
    ledger = PrivacyLedger.open(out / "ledger.json", config.delta, config.epsilon, config.accountant)
    min_nodes = config.clients if deployment is None else 1  # deployed: the quorum loop does the waiting, with timeouts
    strategy = LedgerStrategy(
        FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=min_nodes, min_available_nodes=min_nodes),
        ledger,
    )

    def evaluate_fn(server_round: int, current: ArrayRecord) -> dict[str, Any]:
        set_trainable_state(eval_model, to_state(current))
        return evaluate(eval_model, workload.eval_set(), workload.collator, workload.data.spec.name, device)

    def composed() -> float:
        return ledger.composed_epsilon() if config.private else math.inf

    def on_round_end(result: RoundResult) -> None:
        row = {"round": result.round, metric: result.eval_metrics[metric], **{k: v for k, v in result.eval_metrics.items() if k != metric},
               "epsilon_certified": composed(), "clients_trained": result.clients_trained, "clients_rejected": result.clients_rejected,
               "bytes_sent": result.bytes_sent, "bytes_received": result.bytes_received, "seconds": result.seconds}
        for key in ("train-loss", "padding-efficiency", "examples-per-second"):  # client means, weighted by examples
            if key in result.train_metrics:
                row[key.replace("-", "_")] = float(result.train_metrics[key])
        if metric != "accuracy" and "accuracy" not in row:
            row["accuracy"] = row[metric]
        rounds.append(row)
        save_checkpoint(out / "checkpoint", Checkpoint(result.round, {k: v.numpy() for k, v in to_state(result.arrays).items()}, rounds, config.to_dict()))
        log.info("round %d/%d: %s %.4f, epsilon (certified, max) %s, %d clients, %.1f s",
                 result.round, config.rounds, metric, row[metric], f"{row['epsilon_certified']:.4f}", result.clients_trained, result.seconds)

    if not rounds:
        initial = evaluate_fn(0, arrays)
        rounds.append({"round": 0, metric: initial[metric], **{k: v for k, v in initial.items() if k != metric},
                       "epsilon_certified": 0.0 if config.private else math.inf, "clients_trained": 0, "clients_rejected": 0,
                       "bytes_sent": 0, "bytes_received": 0, "seconds": 0.0})
        log.info("round 0 (initial model): %s %.4f", metric, initial[metric])
    stop_reason: str | None = None
    if deployment is None:
        final = run_rounds(
            strategy, grid, arrays, first_round=first, last_round=config.rounds,
            train_config=ConfigRecord({}), evaluate=evaluate_fn, on_round_end=on_round_end,
        )
    else:
        final, stop_reason = run_with_quorum(
            strategy, grid, arrays, first_round=first, last_round=config.rounds, expected_clients=config.clients,
            options=deployment, evaluate=evaluate_fn, on_round_end=on_round_end,
        )
    set_trainable_state(eval_model, to_state(final))
    save_adapter(eval_model, out / "adapter")
    clients = ledger.report() if config.private else [
        {"id": str(i), "rounds": 0, "steps": 0, "examples": len(s), "epsilon": math.inf, "epsilon_certified": math.inf}
        for i, s in enumerate(workload.shards)
    ] or [{"id": c, "rounds": 0, "steps": 0, "examples": 0, "epsilon": math.inf, "epsilon_certified": math.inf}
          for c in sorted(set(strategy.node_to_client.values()))]
    notes = list(workload.data.notes)
    if not workload.shards:
        notes.append("deployed: each client trained on its own data on its own machine; the server saw only the evaluation split")
    summary = {
        "task": config.task, "metric": metric, "final_accuracy": rounds[-1][metric],
        "final_metrics": {k: v for k, v in rounds[-1].items() if k not in ("round",)},
        "rounds": rounds, "clients": clients, "composed_epsilon": composed(), "delta": config.delta,
        "epsilon_target": config.epsilon, "certified_by": "pld", "estimated_by": config.accountant,
        "bytes_per_round": array_bytes(final), "rejected_updates": strategy.rejected,
        "partition": {"scheme": config.partition, "alpha": config.alpha, "shards": describe_partitions(workload.shards) if workload.shards else []},
        "notes": notes, "seconds": earlier_seconds + time.perf_counter() - started,
        "stopped_early": len(rounds) - 1 < config.rounds,
    }
    if deployment is not None:
        summary["stop_reason"] = stop_reason
        summary["deployment"] = {"min_clients": deployment.quorum(config.clients), "round_retries": deployment.round_retries,
                                 "round_timeout": deployment.round_timeout, "noise_multiplier": deployment.noise_multiplier or None}
    write_metrics_csv(out / "metrics.csv", rounds)
    write_summary(out / "summary.json", summary)
    plot_rounds(out / "plot.png", rounds, metric=metric, title=f"fedtune {config.task}: {config.clients} clients, epsilon {config.epsilon:g}")
    return summary


def make_server_app(config: RunConfig | None = None, *, resume: bool = False) -> ServerApp:
    """A ServerApp for ``config`` (None: read the settings from Flower's run config)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        if config is not None:
            run_server(grid, config, resume=resume)
            return
        run, options = split_run_config(context.run_config)
        if not options.deployed:
            run_server(grid, run, resume=resume or options.resume)
            return
        from fedtune.server.eval_workload import EvalWorkload

        configure_logging()
        run_server(grid, run, resume=resume or options.resume, workload=EvalWorkload.build(run), deployment=options)

    return app


#: Entry point for ``flwr run .`` (``[tool.flwr.app.components] serverapp``).
app = make_server_app()
