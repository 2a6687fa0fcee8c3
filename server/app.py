"""The fedtune ServerApp: ledger-aware FedAvg over LoRA adapters, central evaluation, checkpoints.

:func:`run_server` assembles a :class:`fedtune.server.run.ServerRun` (the loop) from its parts: the
strategy (Flower's FedAvg, FedAvgM, FedAdam or FedYogi, :mod:`fedtune.server.optimizers`, wrapped
by :class:`~fedtune.server.strategy.LedgerStrategy`), how rounds are played (all clients in a
simulation, a quorum in a deployment; under ``secure_aggregation`` each round is Flower's SecAgg+,
:mod:`fedtune.server.secure`), the central evaluation, and the callbacks that persist each
round.

Outputs in ``OUT/``, all written atomically after *every* round (an interrupted run keeps them):
``config.json``, ``ledger.json`` (the server's privacy ledger), ``checkpoint/``, ``metrics.csv``,
``summary.json`` (``"finished": false`` until the run ends), ``plot.png``; at the end ``adapter/``
(the final model in peft's format: ``PeftModel.from_pretrained(base, OUT/adapter)``).
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp

from fedtune.config import RunConfig
from fedtune.io import atomic_write_json
from fedtune.logs import configure_logging
from fedtune.privacy.accountants.reference import certifier
from fedtune.privacy.ledger import PrivacyLedger
from fedtune.protocol import DeployOptions, split_run_config, to_record, to_state
from fedtune.report import plot_rounds, write_metrics_csv, write_summary
from fedtune.server.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from fedtune.server.client_dp import ClientLevelDP, wrap_client_level
from fedtune.server.optimizers import load_strategy_state, make_strategy, strategy_state
from fedtune.server.quorum import QuorumRounds
from fedtune.server.run import PlainRounds, RoundResult, Rounds, ServerCallback, ServerRun, array_bytes
from fedtune.server.scaffold import Scaffold
from fedtune.server.secure import (
    SecureAggregation,
    SecureClientLevelDP,
    SecureQuorumRounds,
    SecureRounds,
    client_level_of,
    secure_summary,
)
from fedtune.server.strategy import LedgerStrategy
from fedtune.workload import get_workload

__all__ = ["make_server_app", "run_server", "majority_rate", "Checkpointer", "resume_run", "RunReport", "RoundLog"]

log = logging.getLogger(__name__)

#: summary.json format: fields are only added (readers of version N read all versions <= N).
SUMMARY_SCHEMA = "fedtune.summary/1"
_TRAIN_KEYS = ("train-loss", "padding-efficiency", "examples-per-second")  # client means, weighted by examples


def majority_rate(dataset: Any) -> float:
    """Share of the most frequent label in ``dataset`` (what always predicting it scores)."""
    labels = list(dataset["label"]) if dataset is not None and len(dataset) else []
    return max(Counter(labels).values()) / len(labels) if labels else math.nan


class Checkpointer(ServerCallback):
    """Saves the global weights, the server optimizer's state and every row after each round
    (``OUT/checkpoint``, atomic; :func:`resume_run` reads it back)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def on_round_end(self, run: ServerRun, row: dict[str, Any], result: RoundResult | None) -> None:
        if result is not None:
            state = {k: v.numpy() for k, v in to_state(run.arrays).items()}
            save_checkpoint(
                self.folder,
                Checkpoint(result.round, state, list(run.rows), run.config.to_dict(), strategy_state(run.strategy)),
            )


def resume_run(run: ServerRun, checkpoint: Checkpoint) -> None:
    """Continue ``run`` after ``checkpoint``: its global weights, rows (so the round numbers go on),
    time so far, and the server optimizer's state (FedAvgM's momentum, FedAdam/FedYogi's moments)."""
    run.arrays, run.rows = to_record(checkpoint.arrays), list(checkpoint.metrics)
    run.earlier_seconds = sum(float(r["seconds"]) for r in run.rows)
    load_strategy_state(run.strategy, checkpoint.server_optimizer)
    stateful = run.config.server_optimizer != "fedavg" and not run.config.centralized
    if stateful and checkpoint.round > 0 and not checkpoint.server_optimizer:
        log.warning(
            "the checkpoint holds no %s state (written by an earlier fedtune): the server optimizer restarts "
            "from zero after round %d",
            run.config.server_optimizer,
            checkpoint.round,
        )


class RoundLog(ServerCallback):
    """One log line per round: the metric, the certified epsilon, the clients, the time."""

    def __init__(self, metric: str) -> None:
        self.metric = metric

    def on_round_end(self, run: ServerRun, row: dict[str, Any], result: RoundResult | None) -> None:
        if result is None:
            log.info("round 0 (initial model): %s %.4f", self.metric, row[self.metric])
            return
        log.info(
            "round %d/%d: %s %.4f, epsilon (certified, max) %.4f, %d clients, %.1f s",
            result.round,
            run.config.rounds,
            self.metric,
            row[self.metric],
            row["epsilon_certified"],
            result.clients_trained,
            result.seconds,
        )

    def on_run_end(self, run: ServerRun) -> None:
        last = run.rows[-1]
        log.info(
            "run %s after round %d: %s %.4f, epsilon (certified, max) %.4f; results in %s "
            "(summary.json, metrics.csv, plot.png, ledger.json, adapter/)",
            "stopped early" if run.stop_reason else "finished",
            int(last["round"]),
            self.metric,
            last[self.metric],
            last["epsilon_certified"],
            run.config.out_dir.resolve(),
        )


@dataclass
class RunReport(ServerCallback):
    """metrics.csv, plot.png and summary.json after every round; the adapter and the final summary at the end."""

    out: Path
    metric: str
    workload: Any
    ledger: PrivacyLedger
    eval_model: Any
    deployment: DeployOptions | None = None
    summary: dict[str, Any] | None = None
    _fixed: dict[str, Any] | None = None  # what does not change between rounds, computed once

    def _fixed_parts(self) -> dict[str, Any]:
        if self._fixed is None:
            shards = self.workload.shards
            self._fixed = {
                "majority": majority_rate(self.workload.data.eval),
                "shards": _describe(shards) if shards else [],
            }
        return self._fixed

    def on_round_end(self, run: ServerRun, row: dict[str, Any], result: RoundResult | None) -> None:
        self._write(run, finished=False)

    def on_run_end(self, run: ServerRun) -> None:
        from fedtune.model import save_adapter, set_trainable_state

        set_trainable_state(self.eval_model, to_state(run.arrays))
        save_adapter(self.eval_model, self.out / "adapter")
        self._write(run, finished=True)

    def _clients(self, run: ServerRun) -> list[dict[str, Any]]:
        """One row per client: what it spent (the ledger) and its last round's sigma, q and steps."""
        strategy = run.strategy
        spent = {str(r["id"]): r for r in self.ledger.report()} if run.config.private else {}
        ids = list(spent) or sorted(strategy.totals, key=_natural) or [str(i) for i in range(len(self.workload.shards))]
        rows = []
        for client in ids:
            reply = strategy.replies.get(client)
            totals = strategy.totals.get(client, {"rounds": 0, "steps": 0})
            row = spent.get(client) or {
                "id": client,
                "rounds": totals["rounds"],
                "steps": totals["steps"],
                "examples": reply.examples if reply else _shard_size(self.workload, client),
                "epsilon": math.inf,
                "epsilon_certified": math.inf,
            }
            row = dict(row)
            row["sampling_rate"] = reply.sampling_rate if reply else None
            row["noise_multiplier"] = (reply.noise_multiplier if reply.dp else 0.0) if reply else None
            row["steps_per_round"] = reply.steps if reply else None
            rows.append(row)
        return rows

    def _write(self, run: ServerRun, *, finished: bool) -> None:
        config, rows = run.config, run.rows
        composed = self.ledger.composed_epsilon() if config.private else math.inf
        notes = list(self.workload.data.notes)
        if not self.workload.shards:
            notes.append(
                "deployed: each client trained on its own data on its own machine; "
                "the server saw only the evaluation split"
            )
        if config.private:
            notes.append(
                "DP noise and sampling were drawn from fresh OS entropy: not repeatable under --seed, by design "
                "(--dp-randomness seeded makes them repeatable, a weaker setting for experiments)"
                if config.dp_randomness == "secret"
                else "--dp-randomness seeded: DP noise and sampling derive from --seed (repeatable; the guarantee does "
                "not hold against anyone who knows the seed: for experiments only)"
            )
        summary: dict[str, Any] = {
            "schema": SUMMARY_SCHEMA,
            "task": config.task,
            "metric": self.metric,
            "final_accuracy": rows[-1][self.metric],
            "final_metrics": {k: v for k, v in rows[-1].items() if k != "round"},
            "majority_class_rate": self._fixed_parts()["majority"],
            "rounds": rows,
            "clients": self._clients(run),
            "composed_epsilon": composed,
            "delta": config.delta,
            "client_learning_rate": config.client_learning_rate,
            "epsilon_target": config.epsilon,
            "certified_by": certifier().name,
            "estimated_by": config.accountant,
            "bytes_per_round": array_bytes(run.arrays),
            "rejected_updates": run.strategy.rejected,
            "partition": {
                "scheme": config.partition,
                "alpha": config.alpha,
                "shards": self._fixed_parts()["shards"],
            },
            "notes": notes,
            "seconds": run.seconds,
            "finished": finished,
            "rounds_done": int(rows[-1]["round"]),
            "stopped_early": finished and int(rows[-1]["round"]) < config.rounds,
            "stop_reason": run.stop_reason,
            "failed": run.failed,
        }
        dp: Any = client_level_of(run.rounds) or run.strategy.inner  # secure rounds: Flower's client-side wrapper
        if isinstance(dp, ClientLevelDP | SecureClientLevelDP):
            spent = self.ledger.client_level_epsilon()
            summary["client_level_epsilon"] = 0.0 if spent is None else spent
            summary["client_level"] = {
                "epsilon_certified": summary["client_level_epsilon"],
                "epsilon_target": config.client_level_epsilon,
                "protects": "a client's whole contribution (all its examples, every round), against anyone who sees "
                "the global models; the record-level epsilon protects one example against anyone who sees the "
                "client's updates",
                "server_releases": len(self.ledger.server_events()),
                "last_round": dp.last_round,
                **dp.plan.to_dict(),
            }
            summary["composed_epsilon_protects"] = "one training example (record-level, max over clients)"
        secure = secure_summary(run.rounds)
        if secure is not None:
            summary["secure_aggregation"] = secure
        if self.deployment is not None:
            d = self.deployment
            summary["deployment"] = {
                "min_clients": d.quorum(config.clients),
                "round_retries": d.round_retries,
                "round_timeout": d.round_timeout,
                "noise_multiplier": d.noise_multiplier or None,
            }
        write_metrics_csv(self.out / "metrics.csv", rows)
        write_summary(self.out / "summary.json", summary)
        plot_rounds(
            self.out / "plot.png",
            rows,
            metric=self.metric,
            majority=summary["majority_class_rate"],
            epsilon_target=config.epsilon,
            client_level_target=config.client_level_epsilon if config.client_level else None,
            title=f"fedtune {config.task}: {config.clients} clients, epsilon {config.epsilon:g}"
            + (f", client-level epsilon {config.client_level_epsilon:g}" if config.client_level else ""),
        )
        self.summary = summary


def _natural(client: str) -> tuple[int, str]:
    return (int(client), "") if client.isdigit() else (1 << 30, client)


def _shard_size(workload: Any, client: str) -> int:
    return len(workload.shards[int(client)]) if client.isdigit() and int(client) < len(workload.shards) else 0


def _describe(shards: list[Any]) -> list[dict[str, Any]]:
    from fedtune.data import describe_partitions

    return describe_partitions(shards)


def _row_maker(metric: str, private: bool, ledger: PrivacyLedger, *, client_level: bool = False):  # type: ignore[no-untyped-def]
    """The one schema of a metrics.csv row (round 0 is the initial model).

    ``epsilon_certified`` is the record-level epsilon (max over clients); with client-level DP on,
    ``client_level_epsilon`` (certified, the server's noise) follows it.
    """

    def make_row(run: ServerRun, metrics: dict[str, Any], result: RoundResult | None) -> dict[str, Any]:
        row: dict[str, Any] = {
            "round": result.round if result else 0,
            metric: metrics[metric],
            **{k: v for k, v in metrics.items() if k != metric},
        }
        if metric != "accuracy" and "accuracy" not in row:
            row["accuracy"] = row[metric]
        row["epsilon_certified"] = (ledger.composed_epsilon() if result else 0.0) if private else math.inf
        if client_level:
            row["client_level_epsilon"] = (ledger.client_level_epsilon() or 0.0) if result else 0.0
        row.update(
            clients_trained=result.clients_trained if result else 0,
            clients_rejected=result.clients_rejected if result else 0,
            bytes_sent=result.bytes_sent if result else 0,
            bytes_received=result.bytes_received if result else 0,
            seconds=result.seconds if result else 0.0,
        )
        for key in _TRAIN_KEYS:
            if result and key in result.train_metrics:
                row[key.replace("-", "_")] = float(result.train_metrics[key])
        return row

    return make_row


def run_server(
    grid: Grid,
    config: RunConfig,
    *,
    resume: bool = False,
    workload: Any = None,
    deployment: DeployOptions | None = None,
) -> dict[str, Any]:
    """Run the whole federation for ``config`` on ``grid``; returns the summary (also written to disk).

    ``workload`` defaults to the simulation's shared :class:`~fedtune.workload.Workload`; a deployed
    server passes an :class:`~fedtune.server.eval_workload.EvalWorkload` (no client data) and its
    ``deployment`` options, and its rounds then run under a quorum
    (:class:`fedtune.server.quorum.QuorumRounds`).

    Raises
    ------
    fedtune.server.run.RunInterrupted
        If the run was asked to stop; every finished round is saved and ``--resume`` continues it.
    """
    from fedtune.data import main_metric
    from fedtune.evaluate import evaluate
    from fedtune.model import get_trainable_state, pick_device, set_trainable_state

    out = config.out_dir
    workload = get_workload(config) if workload is None else workload
    metric = main_metric(workload.data.spec)
    device = pick_device()
    eval_model = workload.new_model()
    checkpoint = load_checkpoint(out / "checkpoint") if resume else None
    atomic_write_json(out / "config.json", config.to_dict())
    ledger = PrivacyLedger.open(out / "ledger.json", config.delta, config.epsilon, config.accountant)
    min_nodes = config.clients if deployment is None else 1  # deployed: the quorum rounds do the waiting, with timeouts
    rounds: Rounds = PlainRounds() if deployment is None else QuorumRounds(deployment, config.clients)
    if config.secure_aggregation:
        # SecAgg+ plays the rounds (server/secure.py); the strategy below keeps the ledger and per-client bookkeeping
        inner = make_strategy(config, min_nodes)
        shards = workload.shards if deployment is None else []
        secure = SecureAggregation(
            config,
            ledger,
            largest_shard=max((len(s) for s in shards), default=0) or None,
            timeout=3600.0 if deployment is None else deployment.round_timeout,
        )
        rounds = SecureRounds(secure) if deployment is None else SecureQuorumRounds(secure, deployment, config.clients)
    elif config.client_level:
        inner = wrap_client_level(config, ledger, min_nodes)
    else:
        inner = make_strategy(config, min_nodes)
        if config.scaffold:
            inner = Scaffold(inner)
    strategy = LedgerStrategy(inner, ledger)

    def evaluate_arrays(arrays: ArrayRecord) -> dict[str, Any]:
        set_trainable_state(eval_model, to_state(arrays))
        return evaluate(eval_model, workload.eval_set(), workload.collator, workload.data.spec.name, device)

    report = RunReport(out, metric, workload, ledger, eval_model, deployment)
    run = ServerRun(
        config=config,
        strategy=strategy,
        grid=grid,
        arrays=to_record(get_trainable_state(eval_model)),
        evaluate=evaluate_arrays,
        make_row=_row_maker(metric, config.private, ledger, client_level=config.client_level),
        rounds=rounds,
        callbacks=[Checkpointer(out / "checkpoint"), RoundLog(metric), report],
    )
    if checkpoint is not None:
        resume_run(run, checkpoint)
        log.info("resuming after round %d from %s", checkpoint.round, out / "checkpoint")
    run.run()
    if report.summary is None:  # pragma: no cover - RunReport writes it after every round
        raise RuntimeError("the run ended without a summary")
    return report.summary


def make_server_app(config: RunConfig | None = None, *, resume: bool = False) -> ServerApp:
    """A ServerApp for ``config`` (None: read the settings from Flower's run config)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        if config is not None:
            run_server(grid, config, resume=resume)
            return
        run, options = split_run_config(context.run_config)
        configure_logging()
        if not options.deployed:
            run_server(grid, run, resume=resume or options.resume)
            return
        from fedtune.server.eval_workload import EvalWorkload

        run_server(grid, run, resume=resume or options.resume, workload=EvalWorkload.build(run), deployment=options)

    return app


#: Entry point for ``flwr run .`` (``[tool.flwr.app.components] serverapp``).
app = make_server_app()
