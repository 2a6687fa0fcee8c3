"""Run a federation on Flower's simulation engine (Ray backend), locally or on a Ray cluster."""

from __future__ import annotations

import logging
import math
import os
import signal
import threading
import time
from typing import Any

from fedtune.config import RunConfig
from fedtune.errors import RunFailed
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
    small = [k for k, s in enumerate(workload.shards) if config.client_batch_size(len(s)) >= len(s)]
    if config.private and small:
        log.info(
            "clients %s hold no more examples than their batch: they train on their whole shard at every "
            "step (q = 1, no amplification by subsampling)",
            ", ".join(map(str, small)),
        )
    for note in workload.data.notes:
        if note not in _NOTES_SHOWN:  # a grid checks many cells of the same data: say each fact once
            _NOTES_SHOWN.add(note)
            log.info("data: %s", note)


_NOTES_SHOWN: set[str] = set()


def simulate(config: RunConfig, *, resume: bool = False) -> dict[str, Any]:
    """Run ``config`` through ``flwr.simulation.run_simulation`` and return ``summary.json``'s content.

    Ray is started for the run (or joined with ``config.ray_address``) and shut down afterwards,
    whatever happens. Ctrl-C stops the run within seconds: the ServerApp thread is told to stop
    (:data:`fedtune.server.run.STOP`), Ray and its workers are shut down, and every finished round
    stays on disk (``--resume`` continues it).

    Raises
    ------
    KeyboardInterrupt
        On Ctrl-C, after the clean-up.
    fedtune.errors.RunFailed
        When the run stopped because a client failed (e.g. ran out of memory); the message names the
        cause and the knob to turn. Finished rounds are kept.
    """
    from flwr.simulation import run_simulation

    from fedtune.client.app import make_client_app
    from fedtune.server.app import make_server_app
    from fedtune.server.run import STOP

    prepare(config, resume=resume)
    summary_path = config.out_dir / "summary.json"
    if summary_path.exists() and not resume:
        summary_path.unlink()  # a stale summary of a run interrupted before its first checkpoint
    init_args: dict[str, Any] = (
        {"address": config.ray_address} if config.ray_address else {"num_cpus": max(1, os.cpu_count() or 1)}
    )
    init_args["log_to_driver"] = False
    backend_config = {
        "client_resources": {"num_cpus": config.cpus_per_client, "num_gpus": config.gpus_per_client},
        "init_args": init_args,
    }
    STOP.clear()
    _INTERRUPTED.clear()
    previous = signal.getsignal(signal.SIGINT)
    if previous is signal.default_int_handler and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _on_sigint)  # mark the interruption before Ray's actors report it
    flower = logging.getLogger("flwr")
    for stale in [f for f in flower.filters if isinstance(f, _InterruptedActorFilter)]:
        flower.removeFilter(stale)  # left by an earlier interrupted run in this process
    actor_filter = _InterruptedActorFilter()
    flower.addFilter(actor_filter)
    try:
        run_simulation(
            server_app=make_server_app(config, resume=resume),
            client_app=make_client_app(config),
            num_supernodes=config.clients,
            backend_config=backend_config,
        )
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not break the clean-up
        _INTERRUPTED.set()
        STOP.set()  # the ServerApp thread ends its round loop and returns
        _silence_flower_workers()
        raise
    except RuntimeError as err:
        if STOP.is_set():
            _INTERRUPTED.set()
            _silence_flower_workers()
            raise KeyboardInterrupt from err
        raise
    finally:
        STOP.set()
        _wait_for_server_threads(timeout=10.0)
        _shutdown_ray()
        STOP.clear()
        if signal.getsignal(signal.SIGINT) in (signal.SIG_IGN, _on_sigint) and previous is not signal.SIG_IGN:
            signal.signal(signal.SIGINT, previous)
        if not _INTERRUPTED.is_set():  # after Ctrl-C, Flower's threads may still report dying actors
            flower.removeFilter(actor_filter)
    if not summary_path.exists():
        raise RunFailed(f"the simulation ended without writing {summary_path}; see the log above (-v shows more)")
    summary = read_json(summary_path)
    if not isinstance(summary.get("composed_epsilon"), (int, float)):
        summary["composed_epsilon"] = math.inf
    if summary.get("stop_reason") and summary.get("failed"):
        raise RunFailed(f"the run stopped: {summary['stop_reason']}. Finished rounds are in {config.out_dir}")
    return summary


def _wait_for_server_threads(timeout: float) -> None:
    """Join Flower's ServerApp thread (it returns once :data:`~fedtune.server.run.STOP` is set)."""
    deadline = time.monotonic() + timeout
    for thread in threading.enumerate():
        if thread is threading.current_thread() or thread.daemon:
            continue
        target = getattr(thread, "_target", None)
        if target is not None and "server_th" in getattr(target, "__name__", ""):
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                log.warning("the ServerApp thread did not stop within %.0f s", timeout)


_INTERRUPTED = threading.Event()
"""Set by :func:`_on_sigint` the moment Ctrl-C reaches this process."""


def _on_sigint(signum: int, frame: Any) -> None:
    """SIGINT during a simulation: note it (for :class:`_InterruptedActorFilter`), then interrupt."""
    _INTERRUPTED.set()
    _silence_flower_workers()
    signal.default_int_handler(signum, frame)


class _InterruptedActorFilter(logging.Filter):
    """Drop Flower's reports of Ray actors that died because the run was interrupted.

    Ctrl-C in a terminal reaches the whole process group, so Ray's workers can die before the
    driver's Python handler runs; Flower's worker threads then log each ``ActorDiedError`` with a
    traceback. Such a record is held for up to ``grace`` seconds: if the interruption is confirmed
    (:data:`_INTERRUPTED`) it is dropped, otherwise (an actor killed for memory, say) it is logged.
    """

    def __init__(self, grace: float = 3.0) -> None:
        super().__init__("flwr")
        self.grace = grace

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.msg
        if isinstance(msg, BaseException):
            died = "Actor" in type(msg).__name__ or "actor died" in str(msg)
        else:
            text = str(msg)
            died = "ActorDiedError" in text or "RayActorError" in text
        if not died or logging.getLogger("flwr").getEffectiveLevel() <= logging.DEBUG:  # -v shows everything
            return True
        return not _INTERRUPTED.wait(self.grace)


def _silence_flower_workers() -> None:
    """After Ctrl-C, keep Flower's worker threads from printing the actors the shutdown ends.

    Flower's simulation engine runs each client message in a thread that waits on a Ray actor; when
    an interrupted run shuts Ray down, those threads log the ``ActorDiedError`` of every actor still
    busy, with a full traceback, at ERROR. That is the interruption itself, not a fault, and the
    user must see one line saying what was kept. The ``flwr`` logger stays at CRITICAL for the rest
    of the process (its threads may outlive the run by seconds); ``-v`` shows everything.
    """
    flower = logging.getLogger("flwr")
    if flower.getEffectiveLevel() > logging.DEBUG:  # -v: the user asked for everything
        flower.setLevel(logging.CRITICAL)


def _shutdown_ray() -> None:
    try:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    except ImportError:  # pragma: no cover
        pass
