"""Child processes of the deployment commands: start, wait for, and stop whole process trees.

Flower's SuperLink and SuperNode start helpers (``flower-superexec``) which start the apps
(``flwr-serverapp``, ``flwr-clientapp``), some of them in sessions of their own. Killing one process
group is therefore not enough: :func:`stop_tree` collects every descendant *before* signalling (an
orphan would be re-parented and lost), asks them to terminate, and kills what is left.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import psutil

__all__ = ["console_script", "free_port", "start_process", "stop_tree", "tree", "wait_for_port", "ProcessFailed"]

log = logging.getLogger(__name__)


class ProcessFailed(RuntimeError):
    """A child process ended (or never became ready) when it should be running."""


def console_script(name: str) -> str:
    """Path of a console script of this Python environment (next to the interpreter), else ``name``."""
    import sys

    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def start_process(command: Sequence[str], *, log_path: str | Path, env: Mapping[str, str] | None = None,
                  cwd: str | Path | None = None) -> subprocess.Popen[bytes]:
    """Start ``command`` in a new session, its output appended to ``log_path``."""
    path = Path(log_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab") as handle:
        handle.write(f"\n$ {' '.join(command)}\n".encode())
        handle.flush()
        return subprocess.Popen(list(command), stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=dict(env) if env is not None else None, cwd=cwd, start_new_session=True)


def tree(pid: int) -> list[psutil.Process]:
    """``pid`` and all its descendants (empty if ``pid`` is gone)."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def stop_tree(pid: int, *, timeout: float = 10.0, sig: int = signal.SIGTERM) -> None:
    """Stop ``pid`` and every descendant: ``sig`` first, SIGKILL after ``timeout`` seconds."""
    procs = tree(pid)
    for proc in procs:
        try:
            proc.send_signal(sig)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for proc in alive:
        try:
            # a child may have started more processes while the parent shut down
            procs_left = [proc, *proc.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        for left in procs_left:
            try:
                left.kill()
            except psutil.NoSuchProcess:
                pass
    psutil.wait_procs(procs, timeout=5)
    try:  # reap our own direct child, if it is one
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def wait_for_port(host: str, port: int, *, timeout: float, process: subprocess.Popen[bytes] | None = None,
                  what: str = "process", log_path: str | Path | None = None) -> None:
    """Wait until ``host:port`` accepts TCP connections.

    Raises
    ------
    ProcessFailed
        If ``process`` ends first or ``timeout`` seconds pass; the message names ``log_path``.
    """
    deadline = time.monotonic() + timeout
    where = f" (see {log_path})" if log_path else ""
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise ProcessFailed(f"{what} exited with status {process.returncode} before listening on {host}:{port}{where}")
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.2)
    raise ProcessFailed(f"{what} did not listen on {host}:{port} within {timeout:.0f} s{where}")
