"""``fedtune client``: join a federation from this machine with this machine's data.

It checks everything locally first (data, budget, certificates, key), writes the client's own
settings to its state folder, and runs Flower's SuperNode (``flower-supernode``) with them. The data
never leaves the machine: the SuperNode's ClientApp reads it from ``--data`` and sends only DP model
updates. The client's budget (``--epsilon``, ``--delta``) is enforced here, whatever the server asks.

State folder (``--state-dir``, default ``DATA/state`` for a shard folder): ``client.json`` (which
client owns it), ``ledger.json``, ``calibration.json``, ``updates/round-N.npz``, ``events.jsonl``
(every round's decision), ``node-config.toml`` and ``flwr-home/`` (Flower's files).
"""

from __future__ import annotations

import argparse
import logging
import math
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from fedtune.client.node import NodeSettings
from fedtune.io import atomic_write_json, atomic_write_text, read_json

__all__ = ["run_client", "default_state_dir"]

log = logging.getLogger(__name__)


def default_state_dir(data: Path) -> Path:
    """``DATA/state`` for a folder, ``DATA-state`` next to a file."""
    return data / "state" if data.is_dir() else data.with_name(f"{data.stem}-state")


def _check_address(address: str) -> str:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"--superlink {address!r} must be HOST:PORT (e.g. 192.0.2.10:9092)")
    return address


def _check_tls(args: argparse.Namespace) -> tuple[Path, Path] | None:
    if args.insecure:
        if args.root_certificates or args.auth_key:
            raise ValueError(
                "--insecure cannot be combined with --root-certificates or --auth-key (authentication needs TLS)"
            )
        return None
    if not args.root_certificates or not args.auth_key:
        raise ValueError(
            "--root-certificates CA_CRT and --auth-key KEY are required "
            "(TLS and client authentication are on by default; "
            "--insecure only for local experiments)"
        )
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key

    ca, key = Path(args.root_certificates).resolve(), Path(args.auth_key).resolve()
    try:
        x509.load_pem_x509_certificate(ca.read_bytes())
    except (OSError, ValueError) as err:
        raise ValueError(
            f"--root-certificates {args.root_certificates}: not a readable PEM certificate ({err})"
        ) from None
    try:
        private = load_ssh_private_key(key.read_bytes(), None)
    except (OSError, ValueError, TypeError) as err:
        raise ValueError(f"--auth-key {args.auth_key}: not a readable OpenSSH private key ({err})") from None
    if not isinstance(private, ec.EllipticCurvePrivateKey):
        raise ValueError(
            f"--auth-key {args.auth_key}: Flower needs an EC (NIST curve) key; create one with `fedtune keys`"
        )
    return ca, key


def _settings(args: argparse.Namespace) -> NodeSettings:
    from fedtune.data.shards import shard_info
    from fedtune.deployment import check_name
    from fedtune.privacy.events import check_delta

    data = Path(args.data).resolve()
    info = shard_info(data)
    client_id = check_name(args.client_id or info.name or (data.name if data.is_dir() else data.stem))
    delta = check_delta(args.delta)
    if not math.isinf(args.epsilon) and delta >= 1.0 / info.examples:
        raise ValueError(
            f"--delta {args.delta:g} must be below 1 / {info.examples} examples = {1.0 / info.examples:.3g}"
        )
    state = Path(args.state_dir).resolve() if args.state_dir else default_state_dir(data)
    owner = state / "client.json"
    if owner.exists():
        stored = read_json(owner)
        if stored.get("client_id") != client_id:
            raise ValueError(
                f"--state-dir {state} belongs to client {stored.get('client_id')!r}, not {client_id!r}; "
                "each client needs its own state folder"
            )
    atomic_write_json(owner, {"client_id": client_id, "data": str(data), "task": info.task, "examples": info.examples})
    return NodeSettings(
        data,
        state,
        client_id,
        float(args.epsilon),
        delta,
        args.accountant,
        require_secure_aggregation=bool(getattr(args, "require_secure_aggregation", False)),
    )


def _ledger_line(settings: NodeSettings) -> str:
    from fedtune.privacy.ledger import PrivacyLedger

    path = settings.state_dir / "ledger.json"
    if not path.exists():
        return f"client {settings.client_id}: nothing spent (no ledger yet)"
    ledger = PrivacyLedger.load(path)
    rounds = ledger.rounds(settings.client_id)
    return (
        f"client {settings.client_id}: paid for round(s) {rounds or 'none'}, "
        f"epsilon {ledger.certified_epsilon(settings.client_id):.4f} "
        f"(certified, delta {ledger.delta:g}) of budget {settings.epsilon:g}; ledger {path}"
    )


def run_client(args: argparse.Namespace) -> int:
    """Validate, then run ``flower-supernode`` until it stops (see the module docstring)."""
    from fedtune.deployment import child_env, console_script, free_port, stop_tree

    address = _check_address(args.superlink)
    tls = _check_tls(args)
    if args.max_wait_time is not None and not args.max_wait_time > 0:
        raise ValueError(f"--max-wait-time must be > 0 seconds, got {args.max_wait_time}")
    settings = _settings(args)
    node_config = atomic_write_text(settings.state_dir / "node-config.toml", settings.to_toml())
    command = [
        console_script("flower-supernode"),
        "--superlink",
        address,
        "--node-config",
        str(node_config),
        "--port",
        str(free_port("127.0.0.1")),
    ]
    if tls is None:
        bar = "!" * 78
        print(
            f"{bar}\n!! --insecure: NO TLS. Model updates travel in clear text and the server is not verified.\n"
            f"!! Local experiments only.\n{bar}",
            file=sys.stderr,
            flush=True,
        )
        command.append("--insecure")
    else:
        command += ["--root-certificates", str(tls[0]), "--auth-supernode-private-key", str(tls[1])]
    if args.max_wait_time is not None:
        command += ["--max-wait-time", str(args.max_wait_time)]
    env = child_env(FLWR_HOME=str(settings.state_dir / "flwr-home"), PYTHONUNBUFFERED="1")
    budget = "no DP" if math.isinf(settings.epsilon) else f"epsilon {settings.epsilon:g}, delta {settings.delta:g}"
    if settings.require_secure_aggregation:
        budget += "; secure aggregation required"
    print(
        f"client {settings.client_id}: data {settings.data_path}, budget {budget}, state {settings.state_dir}; "
        f"connecting to {address} ({'NO TLS' if tls is None else 'TLS, key ' + tls[1].name})",
        flush=True,
    )
    supernode = subprocess.Popen(command, env=env, start_new_session=True, stdin=subprocess.DEVNULL)

    def _terminate(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        code = supernode.wait()
    except KeyboardInterrupt:
        print(f"\nclient {settings.client_id}: stopping", flush=True)
        code = 130
    finally:
        stop_tree(supernode.pid, timeout=10.0)
        signal.signal(signal.SIGTERM, previous)
        print(_ledger_line(settings), flush=True)
    if code not in (0, 130):
        print(
            f"fedtune client: the SuperNode exited with status {code} (see its message above: an unregistered key, "
            "a certificate the server does not match, or an unreachable server)",
            file=sys.stderr,
        )
    return int(code)
