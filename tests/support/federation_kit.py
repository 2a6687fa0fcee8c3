"""A real deployment on 127.0.0.1 for tests: folders per machine, certificates, keys, shards, processes.

Shared by tests/server/test_federation.py (the TLS timeline: refusals, a killed server and client)
and tests/server/test_federation_secure.py (SecAgg+ over TLS). Every process a test starts through
:class:`Federation` is collected and killed by :meth:`Federation.stop_everything`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from fedtune.data.shards import write_shards
from fedtune.deployment import create_certificates, create_client_keys

__all__ = ["Federation", "checkpoint_round", "prepare"]


@dataclass
class Federation:
    """Folders, processes and what was observed along the timeline."""

    root: Path
    port: int
    env: dict[str, str]
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    refusals: dict[str, subprocess.CompletedProcess[str]] = field(default_factory=dict)
    control_status: int = 0
    fleet_status: int = 0
    killed_server: list[str] = field(default_factory=list)
    server_left_after_kill: list[str] = field(default_factory=list)
    resumed_run: int = 0
    bob_killed_at: float = 0.0
    server_rc: int | None = None
    alice_rc: int | None = None
    leftovers: list[str] = field(default_factory=list)

    # -- folders (one per machine) -----------------------------------------------------------
    @property
    def server(self) -> Path:
        return self.root / "server"

    @property
    def out(self) -> Path:
        return self.server / "out"

    def machine(self, name: str) -> Path:
        return self.root / name

    def log(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    # -- processes ---------------------------------------------------------------------------
    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        with open(self.root / f"{name}.log", "ab") as handle:
            proc = subprocess.Popen(
                [sys.executable, "-m", "fedtune.cli", *args],
                stdout=handle,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                start_new_session=True,
            )
        self.procs.append(proc)
        return proc

    def client_args(self, name: str, **overrides: str) -> list[str]:
        home = self.machine(name)
        args = {
            "--superlink": f"127.0.0.1:{self.port}",
            "--data": str(home / "data"),
            "--epsilon": "8",
            "--delta": "1e-5",
            "--client-id": name,
            "--root-certificates": str(home / "ca.crt"),
            "--auth-key": str(home / "keys" / name),
            **overrides,
        }
        return ["client", *[x for k, v in args.items() for x in ((k,) if v == "" else (k, v)) if v is not None]]

    def server_args(self, run: list[str]) -> list[str]:
        return [
            "server",
            *run,
            "--out",
            str(self.out),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--certs",
            str(self.server / "certs"),
            "--client-keys",
            str(self.server / "client-keys"),
        ]

    def wait(self, what: str, predicate: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.5)
        tails = "\n".join(
            f"--- {n}.log ---\n{self.log(n)[-2500:]}" for n in ("server", "server-resumed", "alice", "bob")
        )
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{tails}")

    def ours(self, flwr_home: str | None = None) -> list[psutil.Process]:
        """Every live process of this federation (by command line or Flower home), wherever it was re-parented;
        with ``flwr_home``, only the processes using that Flower home."""
        mine, marker = [], str(self.root)
        for proc in psutil.process_iter(["pid", "cmdline", "environ"]):
            try:
                cmd = " ".join(proc.info.get("cmdline") or [])
                home = (proc.info.get("environ") or {}).get("FLWR_HOME", "")
                match = home == flwr_home if flwr_home else (marker in cmd or home.startswith(marker))
                if proc.pid != os.getpid() and match and proc.status() != psutil.STATUS_ZOMBIE:
                    mine.append(proc)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return mine

    def kill_tree(self, proc: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> list[str]:
        try:
            root = psutil.Process(proc.pid)
            tree = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            tree = []
        names = []
        for p in tree:
            try:
                names.append(p.name())
                p.send_signal(sig)
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(tree, timeout=15)
        proc.poll()
        return names

    def stop_everything(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                self.kill_tree(proc)
        for left in self.ours():
            try:
                left.kill()
            except psutil.NoSuchProcess:
                pass


def checkpoint_round(out: Path) -> int:
    state = out / "checkpoint" / "state.json"
    try:
        return int(json.loads(state.read_text())["round"]) if state.exists() else 0
    except (ValueError, KeyError):
        return 0


def prepare(root: Path, glue_dir: Path) -> None:
    """Server machine: CA, server certificate, registered public keys. Client machines: key pair, ca.crt, one shard."""
    certs = create_certificates(root / "server" / "certs")
    (root / "server" / "client-keys").mkdir(parents=True)
    write_shards("sst2", 2, root / "partitioner", data_dir=str(glue_dir), seed=3, max_train_examples=160)
    for name, shard in (("alice", 0), ("bob", 1), ("mallory", 0)):
        home = root / name
        keys = create_client_keys(home / "keys", name)
        shutil.copy(certs.ca_cert, home / "ca.crt")
        shutil.copytree(root / "partitioner" / f"client-{shard}", home / "data")
        if name != "mallory":
            shutil.copy(keys.public_key, root / "server" / "client-keys")
    create_certificates(root / "other-ca")
