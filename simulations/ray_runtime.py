"""A private local Ray runtime that several simulations share (``fedtune compare`` runs all its cells on one).

Flower's Ray backend starts Ray for a simulation when none is running and shuts it down at the end, so
a grid of cells would pay Ray's start-up (GCS, raylet, worker pool) once per cell. A driver that joined
an existing cluster with ``ray.init(address=...)`` only disconnects on ``ray.shutdown()``, and the
cluster lives on. :func:`local_ray_cluster` therefore starts a Ray head in a child process::

    python -m fedtune.simulations.ray_runtime --num-cpus N --temp-dir DIR

which calls ``ray.init(num_cpus=N, include_dashboard=False)``, prints the GCS address on stdout, waits
until its stdin closes, and then calls ``ray.shutdown()``. Every simulation joins it with
``RunConfig.ray_address``. On exit (also on an exception or Ctrl-C) the context manager closes the
child's stdin, gives it a few seconds to shut Ray down, and then kills whatever is left of its process
tree, plus any process whose command line names the runtime's private temp folder (a Ray worker
re-parented after its raylet died would otherwise be missed). The child runs in a session of its own,
so a Ctrl-C in the terminal reaches only the driver, which then stops the runtime in order; if the
driver itself is killed, the child sees its stdin close and shuts Ray down.
"""

from __future__ import annotations

import argparse
import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil

__all__ = ["local_ray_cluster", "runtime_processes", "stop_processes", "main"]

log = logging.getLogger(__name__)

#: Line prefix under which the child reports the GCS address on stdout.
ADDRESS_PREFIX = "FEDTUNE_RAY_ADDRESS="


def runtime_processes(temp_dir: str | Path, *, also: tuple[str, ...] = ()) -> list[psutil.Process]:
    """Every process of the Ray runtime whose temp folder is ``temp_dir`` (this process excepted).

    A process belongs to it when its command line mentions ``temp_dir`` (gcs_server, raylet, log monitor)
    or it has a file open under it (workers and agents rename themselves, e.g. ``ray::IDLE``, but write
    their logs there), or one of its command-line arguments ends with one of the strings ``also`` (e.g.
    ``":PORT"`` of the GCS address: ``--address=HOST:PORT``).
    """
    needle = str(temp_dir)
    prefix = str(temp_dir).rstrip("/") + "/"
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if proc.pid == os.getpid():
            continue
        try:
            cmdline = proc.info["cmdline"] or []
            if any(needle in part or part.endswith(also) for part in cmdline) or any(
                f.path.startswith(prefix) for f in proc.open_files()
            ):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def stop_processes(procs: list[psutil.Process], timeout: float = 10.0) -> None:
    """SIGTERM ``procs``, SIGKILL those still alive after ``timeout`` seconds."""
    for proc in procs:
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)


def _read_address(child: subprocess.Popen[str], timeout: float, log_path: Path) -> str:
    """The GCS address the child prints, or a RuntimeError naming its log when it fails or takes too long."""
    assert child.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([child.stdout], [], [], max(0.0, min(1.0, deadline - time.monotonic())))
        if ready:
            line = child.stdout.readline()
            if line.startswith(ADDRESS_PREFIX):
                return line[len(ADDRESS_PREFIX) :].strip()
            if line:
                continue
        if child.poll() is not None:
            tail = log_path.read_text(errors="replace")[-2000:] if log_path.exists() else ""
            raise RuntimeError(f"the local Ray runtime exited with status {child.returncode} before starting:\n{tail}")
    raise RuntimeError(f"the local Ray runtime did not start within {timeout:.0f} s (log: {log_path})")


@contextmanager
def local_ray_cluster(
    num_cpus: int | None = None, *, startup_timeout: float = 120.0, stop_timeout: float = 10.0
) -> Iterator[str]:
    """Start a private local Ray head for the ``with`` block and yield its GCS address (``HOST:PORT``).

    Join it with ``ray.init(address=...)`` (or ``RunConfig.ray_address``); ``ray.shutdown()`` in a driver
    then only disconnects. On exit every process of the runtime is stopped.

    Parameters
    ----------
    num_cpus : int, optional
        CPUs the head offers to Ray (default: every CPU of this machine, as a simulation started
        without ``--ray-address`` uses).
    startup_timeout : float
        Seconds to wait for the head to report its address.
    stop_timeout : float
        Seconds the head gets to shut Ray down cleanly once its stdin is closed, and then again for
        its processes to end after SIGTERM before they are killed.

    Yields
    ------
    str
        The GCS address of the runtime.

    Raises
    ------
    ValueError
        If ``num_cpus`` is not a positive integer.
    RuntimeError
        If the runtime does not start (the message holds the end of its log).
    """
    if num_cpus is None:
        num_cpus = max(1, os.cpu_count() or 1)
    if isinstance(num_cpus, bool) or not isinstance(num_cpus, int) or num_cpus < 1:
        raise ValueError(f"num_cpus must be an integer >= 1, got {num_cpus!r}")
    # short: Ray puts unix sockets under it, whose paths are limited to about 107 characters
    temp_dir = Path(tempfile.mkdtemp(prefix="fedtune-ray-", dir="/tmp" if os.path.isdir("/tmp") else None))
    log_path = temp_dir / "head.log"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # the head must start, not join
    with open(log_path, "ab") as log_file:
        child = subprocess.Popen(
            [sys.executable, "-m", "fedtune.simulations.ray_runtime", "--num-cpus", str(num_cpus)]
            + ["--temp-dir", str(temp_dir)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log_file,
            env=env,
            text=True,
            start_new_session=True,  # a Ctrl-C in the terminal reaches the driver only, which stops us in order
        )
    try:
        address = _read_address(child, startup_timeout, log_path)
        log.info("local Ray runtime at %s (%d CPUs, temp dir %s)", address, num_cpus, temp_dir)
        yield address
    finally:
        shield = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if shield else None  # a 2nd Ctrl-C must not break this
        try:
            _stop(child, temp_dir, stop_timeout)
        finally:
            if shield and previous is not None:
                signal.signal(signal.SIGINT, previous)


def _stop(child: subprocess.Popen[str], temp_dir: Path, timeout: float) -> None:
    """Close the head's stdin, give it ``timeout`` seconds to shut Ray down, then kill what is left."""
    from fedtune.deployment import stop_tree

    # remember the tree now: once the head has exited, its orphans are no longer its descendants
    try:
        members = psutil.Process(child.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        members = []
    try:
        assert child.stdin is not None
        child.stdin.close()  # the head calls ray.shutdown() and exits
    except OSError:
        pass
    try:
        child.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        log.warning("the local Ray runtime did not stop within %.0f s; killing it", timeout)
    stop_tree(child.pid, timeout=timeout)
    left = [p for p in members if p.is_running()] + runtime_processes(temp_dir)
    if left:
        stop_processes(list({p.pid: p for p in left}.values()), timeout)
    if child.stdout is not None:
        child.stdout.close()
    child.wait()
    shutil.rmtree(temp_dir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    """The head process: start Ray, print its address, wait for stdin to close, shut Ray down."""
    parser = argparse.ArgumentParser(prog="python -m fedtune.simulations.ray_runtime", description=main.__doc__)
    parser.add_argument("--num-cpus", type=int, required=True, help="CPUs offered to Ray (>= 1)")
    parser.add_argument("--temp-dir", default=None, help="Ray's temp folder (short: it holds unix sockets)")
    args = parser.parse_args(argv)
    if args.num_cpus < 1:
        parser.error(f"--num-cpus must be an integer >= 1, got {args.num_cpus}")
    import ray

    init_args = {"num_cpus": args.num_cpus, "include_dashboard": False, "log_to_driver": False}
    if args.temp_dir:
        init_args["_temp_dir"] = args.temp_dir
    ray.init(**init_args)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the driver decides when we stop (it closes our stdin)
    try:
        print(f"{ADDRESS_PREFIX}{ray.get_runtime_context().gcs_address}", flush=True)
        os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # nobody reads our stdout any more: never block on it
        sys.stdin.read()  # returns at EOF: the driver closed our stdin, or died
    finally:
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
