"""``fedtune server``: run a federation's server side on this machine.

It starts Flower's SuperLink (TLS and SuperNode authentication on, state in a SQLite file) on the
loopback interface, exposes only its Fleet API on ``--host:--port`` (:mod:`fedtune.server.gateway`),
registers the public keys in ``--client-keys``, submits the fedtune ServerApp as a Flower run
(``flwr run``), reports each round, and stops every process it started when the run ends, fails or
is interrupted. ``fedtune server --resume OUT`` restarts a killed server from its last checkpoint.

Layout of ``OUT``: the results as for ``fedtune simulate`` (``summary.json``, ``metrics.csv``,
``plot.png``, ``ledger.json``, ``checkpoint/``, ``adapter/``, ``config.json``) and ``deploy/``
(``deploy.json``, ``superlink.db``, ``app/pyproject.toml``, ``flwr-home/``, ``logs/``).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import signal
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from fedtune.cliargs import config_from_args
from fedtune.config import RunConfig
from fedtune.deployment import ProcessFailed
from fedtune.io import atomic_write_json, atomic_write_text, read_json
from fedtune.protocol import DeployOptions
from fedtune.server.superlink import FlowerServer, ServerPaths

__all__ = ["serve", "write_app", "DEFAULT_PORT"]

log = logging.getLogger(__name__)

DEFAULT_PORT = 9092


# -- configuration ---------------------------------------------------------------------------
def _settings_from_args(args: argparse.Namespace) -> tuple[RunConfig, DeployOptions, dict[str, Any]]:
    if args.resume:
        out = Path(args.resume).resolve()
        paths = ServerPaths(out / "deploy")
        if not (out / "config.json").exists() or not paths.settings.exists():
            raise ValueError(
                f"--resume {args.resume}: no run of `fedtune server` there "
                "(expected config.json and deploy/deploy.json)"
            )
        config = RunConfig.from_dict({**read_json(out / "config.json"), "out": str(out)})
        stored = read_json(paths.settings)
        options = DeployOptions(**{**stored["options"], "resume": True})
        return config, options, stored["network"]
    config = config_from_args(
        args,
        out=str(Path(args.out).resolve()),
        data_dir=str(Path(args.data_dir).resolve()) if args.data_dir is not None else None,
    )
    options = DeployOptions(
        deployed=True,
        min_clients=args.min_clients,
        round_retries=args.round_retries,
        round_timeout=args.round_timeout,
        wait_timeout=args.wait_timeout,
        noise_multiplier=args.noise_multiplier,
        run_key=uuid.uuid4().hex,
    )
    options.quorum(config.clients)
    if not 1 <= args.port <= 65535:
        raise ValueError(f"--port must be in [1, 65535], got {args.port}")
    from fedtune.deployment import check_host

    network = {
        "host": args.host if args.host in ("0.0.0.0", "::") else check_host(args.host),
        "port": args.port,
        "insecure": bool(args.insecure),
        "certs": None if args.insecure else str(Path(args.certs).resolve()),
        "client_keys": None if args.insecure else str(Path(args.client_keys).resolve()),
    }
    return config, options, network


def _check_network(network: dict[str, Any], clients: int) -> list[Path]:
    """The public keys to register; clear errors for missing certificates or keys."""
    if network["insecure"]:
        return []
    certs = Path(network["certs"])
    missing = [name for name in ("ca.crt", "server.crt", "server.key") if not (certs / name).is_file()]
    if missing:
        raise ValueError(
            f"--certs {certs}: {', '.join(missing)} missing "
            f"(create them with `fedtune certs --out {certs} --host NAME`)"
        )
    keys_dir = Path(network["client_keys"])
    keys = sorted(keys_dir.glob("*.pub")) if keys_dir.is_dir() else []
    if not keys:
        raise ValueError(
            f"--client-keys {keys_dir}: no *.pub files "
            "(each client makes one with `fedtune keys` and sends you the .pub file)"
        )
    if len(keys) < clients:
        log.warning("only %d client key(s) in %s for %d expected clients", len(keys), keys_dir, clients)
    return keys


def _check_port(host: str, port: int) -> None:
    """The public port must be free (another server, or this one still running?)."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as err:
            raise ValueError(
                f"--port {port} on {host} is not available ({err.strerror}); is another server running?"
            ) from None


def _check_eval_data(config: RunConfig) -> None:
    """The evaluation split loads and a local model folder exists (what the ServerApp will need)."""
    from fedtune.data import load_glue

    if (
        config.model
        and config.model.startswith(("/", "./", "../", "~"))
        and not Path(config.model).expanduser().is_dir()
    ):
        raise ValueError(f"--model {config.model!r}: no such local folder")
    load_glue(config.task, config.data_dir, seed=config.seed, max_eval_examples=config.max_eval_examples)


def _last_error(log_file: Path) -> str:
    """The last exception line of a ServerApp log (what failed), or ''."""
    lines = [line.strip() for line in log_file.read_text(errors="replace").splitlines()]
    errors = [line for line in lines if re.match(r"^[A-Za-z_.]*(Error|Exception)\b.*:", line)]
    return errors[-1] if errors else ""


def write_app(folder: Path, config: RunConfig, options: DeployOptions) -> Path:
    """The Flower app submitted with ``flwr run``: only a pyproject.toml naming fedtune's apps.

    The code is the installed ``fedtune`` package on both sides; the FAB carries no code.
    """
    import tomli_w

    document = {
        "build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
        "project": {
            "name": "fedtune-deployment",
            "version": "1.0.0",
            "description": "fedtune ServerApp and ClientApp (installed package)",
            "license": "Apache-2.0",
            "dependencies": [],
        },
        "tool": {
            "flwr": {
                "app": {
                    "publisher": "fedtune",
                    "components": {"serverapp": "fedtune.server.app:app", "clientapp": "fedtune.client.app:app"},
                    "config": {**config.to_flower(), **options.to_flower()},
                }
            }
        },
    }
    return atomic_write_text(folder / "pyproject.toml", tomli_w.dumps(document))


# -- the command -----------------------------------------------------------------------------
def _warn_insecure() -> None:
    bar = "!" * 78
    print(
        f"{bar}\n!! --insecure: NO TLS and NO client authentication. Everything, including model updates, travels\n"
        "!! in clear text, and ANY machine that reaches this port can join as a client. Local experiments only.\n"
        f"{bar}",
        file=sys.stderr,
    )


def _progress(out: Path, shown: int) -> int:
    """Print the rounds checkpointed since round ``shown``; returns the last one."""
    from fedtune.data import get_task_spec, main_metric

    state = out / "checkpoint" / "state.json"
    try:
        data = read_json(state) if state.exists() else None
    except ValueError:
        return shown
    if not data or int(data["round"]) <= shown:
        return shown
    for row in data["metrics"]:
        if int(row["round"]) > shown:
            metric = main_metric(get_task_spec(data["config"]["task"]))
            eps = row["epsilon_certified"]
            eps_text = eps if isinstance(eps, str) else f"{float(eps):.4f}"
            print(
                f"round {row['round']}: {metric} {float(row[metric]):.4f}, epsilon (certified, max) {eps_text}, "
                f"{row['clients_trained']} client(s), {row['clients_rejected']} rejected, "
                f"{float(row['seconds']):.1f} s",
                flush=True,
            )
    return int(data["round"])


def _save_run_log(server: FlowerServer, run_id: int) -> Path:
    result = server.flwr("log", str(run_id), "fedtune", "--show", check=False)
    path = server.paths.logs / f"serverapp-{run_id}.log"
    atomic_write_text(path, result.stdout + result.stderr)
    return path


def serve(args: argparse.Namespace) -> int:
    """Run the server side of a federation until the run ends (see the module docstring)."""
    config, options, network = _settings_from_args(args)
    out = config.out_dir
    if not options.resume and (out / "checkpoint" / "state.json").exists():
        raise ValueError(f"{out} already holds a run; pass --resume {out} to continue it or choose another --out")
    keys = _check_network(network, config.clients)
    _check_port(network["host"], int(network["port"]))
    _check_eval_data(config)
    if network["insecure"]:
        _warn_insecure()
    paths = ServerPaths(out / "deploy")
    atomic_write_json(paths.settings, {"network": network, "options": {**options.__dict__, "resume": False}})
    if not options.resume:
        atomic_write_json(
            out / "config.json", config.to_dict()
        )  # `--resume OUT` works even if the server dies before round 1
    write_app(paths.app, config, options)
    (out / "summary.json").unlink(missing_ok=True)

    def _terminate(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _terminate)
    server = FlowerServer(
        paths, network["host"], int(network["port"]), None if network["insecure"] else Path(network["certs"])
    )
    try:
        return _run(server, keys, config, options, network, paths, as_json=args.json)
    except ProcessFailed as err:
        print(f"fedtune: error: {err}", file=sys.stderr)
        return 1
    finally:
        server.stop()
        signal.signal(signal.SIGTERM, previous)


def _run(
    server: FlowerServer,
    keys: list[Path],
    config: RunConfig,
    options: DeployOptions,
    network: dict[str, Any],
    paths: ServerPaths,
    *,
    as_json: bool,
) -> int:
    """Start the SuperLink, register the keys, submit the run and follow it to its end."""
    from fedtune.report import format_summary

    out = config.out_dir
    server.start_superlink()
    for key in keys:  # before the gateway opens: a client must never find its key missing
        print(f"client key {key.name}: {server.register(key)}", flush=True)
    server.start_gateway()
    where = f"{network['host']}:{network['port']}"
    print(
        f"SuperLink ready; clients connect to {where} "
        f"({'NO TLS' if server.insecure else 'TLS, registered keys only'}); "
        f"logs in {paths.logs}",
        flush=True,
    )
    run_id = server.submit()
    print(
        f"{'resumed' if options.resume else 'started'} run {run_id}: {config.clients} clients, {config.rounds} rounds, "
        f"min-clients {options.quorum(config.clients)}",
        flush=True,
    )
    shown, status, next_check = 0, "pending", 0.0
    while not status.startswith("finished"):
        time.sleep(2.0)
        if not server.alive():
            raise ProcessFailed(f"the SuperLink or the gateway stopped unexpectedly (see {paths.logs})")
        shown = _progress(out, shown)
        if time.monotonic() >= next_check:
            status, next_check = server.status(run_id), time.monotonic() + 8.0
    _progress(out, shown)
    log_file = _save_run_log(server, run_id)
    summary_path = out / "summary.json"
    if status != "finished:completed" or not summary_path.exists():
        cause = _last_error(log_file)
        print(
            f"fedtune: error: run {run_id} ended as {status} without a summary"
            f"{': ' + cause if cause else ''}; see {log_file}",
            file=sys.stderr,
        )
        return 1
    summary = read_json(summary_path)
    print(json.dumps(summary, indent=2) if as_json else "\n" + format_summary(summary))
    print(
        f"\noutputs in {out}/: summary.json, metrics.csv, plot.png, ledger.json, checkpoint/, adapter/; "
        f"logs in {paths.logs}"
    )
    if summary.get("stop_reason"):
        print(f"fedtune: the run stopped early: {summary['stop_reason']}", file=sys.stderr)
        return 1
    return 0
