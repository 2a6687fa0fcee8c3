"""Flower's deployment runtime driven from Python: SuperLink, Fleet gateway and the ``flwr`` CLI.

Everything here calls Flower's own commands (``flower-superlink``, ``flwr supernode register``,
``flwr run``, ``flwr ls``), the same a user could type (``docs/deployment.md`` lists them). The
SuperLink keeps its state (registered SuperNodes, runs) in a SQLite file, so a restarted server
finds its clients again; the ``flwr`` CLI gets a private Flower home with one connection, ``fedtune``.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from fedtune.deployment import (
    ProcessFailed,
    child_env,
    console_script,
    free_port,
    read_public_key_name,
    start_process,
    stop_tree,
    wait_for_port,
)

__all__ = ["FlowerServer", "ServerPaths", "CONNECTION"]

log = logging.getLogger(__name__)

#: Name of the SuperLink connection in the private Flower home.
CONNECTION = "fedtune"


@dataclass(frozen=True)
class ServerPaths:
    """Files of a deployed server under ``OUT/deploy``."""

    root: Path

    @property
    def flwr_home(self) -> Path:
        return self.root / "flwr-home"

    @property
    def app(self) -> Path:
        return self.root / "app"

    @property
    def database(self) -> Path:
        return self.root / "superlink.db"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def settings(self) -> Path:
        return self.root / "deploy.json"


class FlowerServer:
    """A SuperLink on the loopback interface plus the gateway that exposes its Fleet API.

    Start with :meth:`start_superlink`, register the clients' keys (:meth:`register`), then
    :meth:`start_gateway`; :meth:`stop` ends every process, also ones the SuperLink left behind.

    Parameters
    ----------
    paths : ServerPaths
        Where state, logs and the app bundle live.
    host, port : str, int
        The public address clients connect to (the gateway's).
    certs : Path or None
        Folder with ``ca.crt``, ``server.crt``, ``server.key``; None runs without TLS (``--insecure``).
    """

    def __init__(self, paths: ServerPaths, host: str, port: int, certs: Path | None) -> None:
        self.paths = paths
        self.host, self.port = host, port
        self.certs = certs
        self.internal_port = free_port("127.0.0.1")
        self.superlink: subprocess.Popen[bytes] | None = None
        self.gateway: subprocess.Popen[bytes] | None = None

    # -- environment -------------------------------------------------------------------------
    @property
    def insecure(self) -> bool:
        return self.certs is None

    def env(self) -> dict[str, str]:
        """Environment of every Flower process: private Flower home, no runtime installs."""
        return child_env(
            FLWR_HOME=str(self.paths.flwr_home),
            FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
            PYTHONUNBUFFERED="1",
        )

    def _write_connection(self) -> None:
        lines = [
            "[superlink]",
            f'default = "{CONNECTION}"',
            "",
            f"[superlink.{CONNECTION}]",
            f'address = "127.0.0.1:{self.internal_port}"',
        ]
        certs = self.certs
        lines.append("insecure = true" if certs is None else f"root-certificates = {json.dumps(str(certs / 'ca.crt'))}")
        self.paths.flwr_home.mkdir(parents=True, exist_ok=True)
        (self.paths.flwr_home / "config.toml").write_text("\n".join(lines) + "\n", encoding="utf-8")

    # -- processes ---------------------------------------------------------------------------
    def start_superlink(self, timeout: float = 60.0) -> None:
        """Start the SuperLink on the loopback interface (TLS and SuperNode authentication unless insecure)."""
        self._write_connection()
        command = [
            console_script("flower-superlink"),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.internal_port),
            "--database",
            str(self.paths.database),
            "--disable-runtime-dependency-installation",
        ]
        certs = self.certs
        if certs is None:
            command.append("--insecure")
        else:
            command += [
                "--ssl-ca-certfile",
                str(certs / "ca.crt"),
                "--ssl-certfile",
                str(certs / "server.crt"),
                "--ssl-keyfile",
                str(certs / "server.key"),
                "--enable-supernode-auth",
            ]
        log_path = self.paths.logs / "superlink.log"
        self.superlink = start_process(command, log_path=log_path, env=self.env(), cwd=self.paths.root)
        wait_for_port(
            "127.0.0.1",
            self.internal_port,
            timeout=timeout,
            process=self.superlink,
            what="flower-superlink",
            log_path=log_path,
        )
        self._wait_for_control_api(timeout)

    def start_gateway(self, timeout: float = 60.0) -> None:
        """Expose the SuperLink's Fleet API on the public address (after the keys are registered)."""
        listen = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
        gateway = [
            sys.executable,
            "-m",
            "fedtune.server.gateway",
            "--listen",
            listen,
            "--upstream",
            f"127.0.0.1:{self.internal_port}",
        ]
        certs = self.certs
        gateway += (
            ["--insecure"]
            if certs is None
            else [
                "--certfile",
                str(certs / "server.crt"),
                "--keyfile",
                str(certs / "server.key"),
                "--ca-file",
                str(certs / "ca.crt"),
            ]
        )
        gateway_log = self.paths.logs / "gateway.log"
        self.gateway = start_process(gateway, log_path=gateway_log, env=self.env())
        probe = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        wait_for_port(
            probe, self.port, timeout=timeout, process=self.gateway, what="the Fleet gateway", log_path=gateway_log
        )

    def _wait_for_control_api(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            result = self.flwr("ls", CONNECTION, "--format", "json", check=False)
            if _json(result.stdout).get("success"):
                return
            if time.monotonic() > deadline or (self.superlink is not None and self.superlink.poll() is not None):
                raise ProcessFailed(
                    f"the SuperLink's Control API did not answer (see {self.paths.logs / 'superlink.log'}): "
                    f"{_error(result)}"
                )
            time.sleep(1.0)

    def alive(self) -> bool:
        """Whether the SuperLink and the gateway are both still running."""
        return all(p is not None and p.poll() is None for p in (self.superlink, self.gateway))

    def stop(self) -> None:
        """Stop the gateway, then the SuperLink with its SuperExec and ServerApp processes."""
        for proc in (self.gateway, self.superlink):
            if proc is not None:
                stop_tree(proc.pid, timeout=10.0)
        self._stop_orphans()

    def _stop_orphans(self) -> None:
        # Flower starts its SuperExec in a session of its own; if the SuperLink died first, the
        # SuperExec (and a ServerApp it started) may outlive it. They all name our Flower home.
        marker = str(self.paths.flwr_home)
        for proc in psutil.process_iter(["pid", "environ"]):
            try:
                env = proc.info.get("environ") or {}
                if env.get("FLWR_HOME") == marker and proc.pid != os.getpid():
                    stop_tree(proc.pid, timeout=5.0)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue

    # -- flwr CLI ----------------------------------------------------------------------------
    def flwr(self, *args: str, check: bool = True, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        """Run a ``flwr`` CLI command against this SuperLink (logged to ``logs/flwr.log``)."""
        result = subprocess.run(
            [console_script("flwr"), *args],
            capture_output=True,
            text=True,
            env=self.env(),
            timeout=timeout,
            cwd=self.paths.root,
        )
        self.paths.logs.mkdir(parents=True, exist_ok=True)
        with open(self.paths.logs / "flwr.log", "a", encoding="utf-8") as handle:
            handle.write(f"$ flwr {' '.join(args)}\n{result.stdout}{result.stderr}\n")
        if check and result.returncode != 0:
            raise ProcessFailed(f"flwr {' '.join(args)} failed: {_error(result)}")
        return result

    def register(self, public_key: Path) -> str:
        """Register a SuperNode's public key; returns ``registered`` or ``already registered``."""
        result = self.flwr(
            "supernode",
            "register",
            str(public_key),
            CONNECTION,
            "--name",
            read_public_key_name(public_key)[:64],
            "--format",
            "json",
            check=False,
        )
        answer = _json(result.stdout)
        if answer.get("success"):
            return "registered"
        if "already in use" in str(answer.get("error-message", "")).lower():
            return "already registered"
        raise ProcessFailed(f"could not register {public_key}: {_error(result)}")

    def submit(self) -> int:
        """Submit the app in ``paths.app`` as a run; returns the run id."""
        result = self.flwr("run", str(self.paths.app), CONNECTION, "--format", "json", check=False)
        answer = _json(result.stdout)
        if not answer.get("success") or not answer.get("run-id"):
            raise ProcessFailed(f"flwr run failed: {_error(result)}")
        return int(answer["run-id"])

    def status(self, run_id: int) -> str:
        """The run's status (``pending``, ``running``, ``finished:completed``, ``finished:failed`` ...),
        or ``unknown``."""
        result = self.flwr("ls", CONNECTION, "--run-id", str(run_id), "--format", "json", check=False)
        runs = _json(result.stdout).get("runs") or []
        return str(runs[0].get("status", "unknown")) if runs else "unknown"


def _json(text: str) -> dict[str, Any]:
    start = text.find("{")
    if start < 0:
        return {}
    try:
        value = json.loads(text[start:])
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def _error(result: subprocess.CompletedProcess[str]) -> str:
    answer = _json(result.stdout)
    message = str(answer.get("error-message") or "").strip() or (result.stderr or result.stdout).strip()
    return " ".join(message.split())[-500:] or f"exit status {result.returncode}"


#: Port of the SuperLink that ``flwr run`` starts for local simulations (Flower's own setting).
def local_superlink_port() -> int:
    """The port ``flwr run`` uses for its managed local SuperLink (``FLWR_LOCAL_SUPERLINK_HTTP_API_PORT``)."""
    return int(os.environ.get("FLWR_LOCAL_SUPERLINK_HTTP_API_PORT", "39091"))


def stop_local_superlink(port: int | None = None) -> list[int]:
    """Stop the SuperLink that ``flwr run`` left running for local simulations, with its helpers.

    Only a ``flower-superlink --simulation`` process serving ``port`` is stopped (with every process
    it started), never another SuperLink on the machine. Returns the process ids stopped.
    """
    port = local_superlink_port() if port is None else port
    stopped = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmd = proc.info.get("cmdline") or []
        if not any(part.endswith("flower-superlink") for part in cmd) or "--simulation" not in cmd:
            continue
        if "--port" in cmd and cmd.index("--port") + 1 < len(cmd) and cmd[cmd.index("--port") + 1] == str(port):
            stop_tree(proc.info["pid"])
            stopped.append(int(proc.info["pid"]))
    return stopped
