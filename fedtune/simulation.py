"""Run a federation on Flower's simulation engine (Ray backend), locally or on a Ray cluster."""

from __future__ import annotations

import logging
import math
import os
from typing import Any

from fedtune.config import RunConfig
from fedtune.io import read_json

__all__ = ["check_workload", "prepare", "simulate"]

log = logging.getLogger(__name__)


def prepare(config: RunConfig, *, resume: bool = False) -> None:
    """Check everything that can be checked before any training, with clear errors.

    The output folder must not hold a run unless ``resume`` (and must hold one if it is set); then
    :func:`check_workload`.
    """
    out = config.out_dir
    if (out / "checkpoint" / "state.json").exists() and not resume:
        raise ValueError(f"{out} already holds a run; pass --resume {out} to continue it or choose another --out")
    if resume and not (out / "checkpoint" / "state.json").exists():
        raise ValueError(f"--resume {out}: no checkpoint found there (expected {out / 'checkpoint' / 'state.json'})")
    check_workload(config)


def check_workload(config: RunConfig) -> None:
    """Load the data and the model of ``config`` and check that the run can start.

    Unknown task or model, a missing data folder, a partition that leaves a client empty or more
    clients than examples all fail here. For a private run it also checks that
    ``delta < 1 / smallest shard`` (a delta that large would allow leaking a whole record). A client
    whose shard is smaller than the batch size trains on the whole shard at every step (q = 1).
    """
    from fedtune.workload import get_workload

    workload = get_workload(config)
    smallest = min(len(s) for s in workload.shards)
    if config.private and config.delta >= 1.0 / smallest:
        raise ValueError(
            f"delta = {config.delta:g} must be below 1 / (smallest shard) = 1/{smallest} = {1.0 / smallest:.3g}; "
            "a larger delta allows an output that reveals a whole record"
        )
    small = [k for k, s in enumerate(workload.shards) if len(s) < config.batch_size]
    if config.private and small:
        log.info("clients %s hold fewer examples than the batch size %d: they train on their whole shard at every "
                 "step (q = 1, no amplification by subsampling)", ", ".join(map(str, small)), config.batch_size)
    for note in workload.data.notes:
        log.info("data: %s", note)


def simulate(config: RunConfig, *, resume: bool = False) -> dict[str, Any]:
    """Run ``config`` through ``flwr.simulation.run_simulation`` and return ``summary.json``'s content.

    Ray is started for the run (or joined with ``config.ray_address``) and shut down afterwards,
    whatever happens.
    """
    from flwr.simulation import run_simulation

    from fedtune.client.app import make_client_app
    from fedtune.server.app import make_server_app

    prepare(config, resume=resume)
    summary_path = config.out_dir / "summary.json"
    if summary_path.exists():
        summary_path.unlink()
    init_args: dict[str, Any] = {"address": config.ray_address} if config.ray_address else {"num_cpus": max(1, os.cpu_count() or 1)}
    init_args["log_to_driver"] = False
    backend_config = {
        "client_resources": {"num_cpus": config.cpus_per_client, "num_gpus": config.gpus_per_client},
        "init_args": init_args,
    }
    try:
        run_simulation(
            server_app=make_server_app(config, resume=resume),
            client_app=make_client_app(config),
            num_supernodes=config.clients,
            backend_config=backend_config,  # type: ignore[arg-type]
        )
    finally:
        try:
            import ray

            if ray.is_initialized():
                ray.shutdown()
        except ImportError:  # pragma: no cover
            pass
    if not summary_path.exists():
        raise RuntimeError(f"the simulation ended without writing {summary_path}; see the log above")
    summary = read_json(summary_path)
    if not isinstance(summary.get("composed_epsilon"), (int, float)):
        summary["composed_epsilon"] = math.inf
    return summary
