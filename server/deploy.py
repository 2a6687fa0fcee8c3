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

from fedtune.argtypes import epsilon_arg as _epsilon
from fedtune.argtypes import optional_int_arg as _optional_int
from fedtune.config import RunConfig
from fedtune.deployment import DeployOptions
from fedtune.io import atomic_write_json, atomic_write_text, read_json
from fedtune.processes import ProcessFailed
from fedtune.server.superlink import FlowerServer, ServerPaths

__all__ = ["add_server_parser", "serve", "write_app"]

log = logging.getLogger(__name__)

DEFAULT_PORT = 9092

_RUN_KEYS = ("task", "model", "data_dir", "clients", "rounds", "epsilon", "delta", "local_epochs", "local_steps", "batch_size",
             "physical_batch_size", "precision",
             "max_grad_norm", "learning_rate", "lora_rank", "lora_alpha", "lora_dropout", "lora_targets", "max_eval_examples",
             "max_length", "seed", "accountant", "out")


def add_server_parser(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``fedtune server``."""
    d = RunConfig.__dataclass_fields__
    o = DeployOptions()
    p = subparsers.add_parser("server", help="run the server of a networked federation (Flower SuperLink + the fedtune ServerApp)",
                              description=__doc__.split("\n\n")[1] if __doc__ else None)
    run = p.add_argument_group("run settings (as for fedtune simulate)")
    run.add_argument("--task", default=d["task"].default, help="GLUE task (default sst2)")
    run.add_argument("--model", default=None, help="Hugging Face model id or local path (default all-MiniLM-L6-v2); clients load the same")
    run.add_argument("--data-dir", default=None, help="local GLUE folder for the evaluation split (default $FEDTUNE_DATA_DIR, else the hub)")
    run.add_argument("--clients", type=int, default=2, help="clients expected (default 2); each needs a registered key")
    run.add_argument("--rounds", type=int, default=d["rounds"].default, help="rounds (default 5)")
    run.add_argument("--epsilon", type=_epsilon, default=d["epsilon"].default,
                     help="the budget the server expects per client ('inf': no DP); each client enforces its own")
    run.add_argument("--delta", type=float, default=d["delta"].default, help="delta of the server's ledger (default 1e-05)")
    run.add_argument("--local-epochs", type=float, default=1.0, help="local epochs per round (default 1)")
    run.add_argument("--local-steps", type=int, default=None, help="local optimizer steps per round (overrides --local-epochs)")
    run.add_argument("--batch-size", type=int, default=d["batch_size"].default, help="expected (Poisson) batch size (default 32)")
    run.add_argument("--physical-batch-size", type=int, default=None,
                     help="most examples per micro-batch on the clients (memory and speed only; default: chosen from model and device)")
    run.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="fp32, or bf16 autocast where the hardware has it (default fp32)")
    run.add_argument("--max-grad-norm", type=float, default=1.0, help="per-example clipping norm C (default 1.0)")
    run.add_argument("--learning-rate", "--lr", type=float, default=d["learning_rate"].default, help="learning rate (default 0.002)")
    run.add_argument("--lora-rank", type=int, default=8, help="LoRA rank (default 8)")
    run.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA alpha (default 16)")
    run.add_argument("--lora-dropout", type=float, default=0.0, help="LoRA dropout (default 0)")
    run.add_argument("--lora-targets", default="", help="comma-separated LoRA target modules (default: per architecture)")
    run.add_argument("--max-eval-examples", type=_optional_int, default=None, help="seeded subset of the eval split")
    run.add_argument("--max-length", type=int, default=d["max_length"].default, help="token limit (default 128)")
    run.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    run.add_argument("--accountant", default="saddlepoint", help="estimating accountant (default saddlepoint; pld certifies)")
    run.add_argument("--out", default="runs/server", help="output folder (default runs/server)")
    run.add_argument("--resume", metavar="OUT", default=None, help="restart the server of the run in OUT from its last checkpoint")
    run.add_argument("--json", action="store_true", help="print summary.json instead of the table")
    net = p.add_argument_group("network and security")
    net.add_argument("--host", default="0.0.0.0", help="address the clients connect to (default 0.0.0.0: every interface)")
    net.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port the clients connect to (default {DEFAULT_PORT})")
    net.add_argument("--certs", default="certs", help="folder with ca.crt, server.crt, server.key from `fedtune certs` (default certs)")
    net.add_argument("--client-keys", default="client-keys", help="folder of the clients' *.pub keys to register (default client-keys)")
    net.add_argument("--insecure", action="store_true", help="NO TLS and NO client authentication: local experiments only")
    faults = p.add_argument_group("faults")
    faults.add_argument("--min-clients", type=int, default=o.min_clients, help="valid updates a round needs (default 0: all --clients)")
    faults.add_argument("--round-retries", type=int, default=o.round_retries, help=f"retries of a round short of --min-clients (default {o.round_retries})")
    faults.add_argument("--round-timeout", type=float, default=o.round_timeout, help=f"seconds to wait for a round's replies (default {o.round_timeout:g})")
    faults.add_argument("--wait-timeout", type=float, default=o.wait_timeout, help=f"seconds to wait for clients to connect (default {o.wait_timeout:g})")
    faults.add_argument("--noise-multiplier", type=float, default=0.0,
                        help="ask every client for this sigma (default 0: each client calibrates for its own budget)")
    p.set_defaults(handler=serve)


# -- configuration ---------------------------------------------------------------------------
def _settings_from_args(args: argparse.Namespace) -> tuple[RunConfig, DeployOptions, dict[str, Any]]:
    if args.resume:
        out = Path(args.resume).resolve()
        paths = ServerPaths(out / "deploy")
        if not (out / "config.json").exists() or not paths.settings.exists():
            raise ValueError(f"--resume {args.resume}: no run of `fedtune server` there (expected config.json and deploy/deploy.json)")
        config = RunConfig.from_dict({**read_json(out / "config.json"), "out": str(out)})
        stored = read_json(paths.settings)
        options = DeployOptions(**{**stored["options"], "resume": True})
        return config, options, stored["network"]
    values = {k: getattr(args, k) for k in _RUN_KEYS}
    values["out"] = str(Path(args.out).resolve())
    if values["data_dir"] is not None:
        values["data_dir"] = str(Path(values["data_dir"]).resolve())
    config = RunConfig(**values)
    options = DeployOptions(deployed=True, min_clients=args.min_clients, round_retries=args.round_retries, round_timeout=args.round_timeout,
                            wait_timeout=args.wait_timeout, noise_multiplier=args.noise_multiplier, run_key=uuid.uuid4().hex)
    options.quorum(config.clients)
    if not 1 <= args.port <= 65535:
        raise ValueError(f"--port must be in [1, 65535], got {args.port}")
    from fedtune.certs import check_host

    network = {"host": args.host if args.host in ("0.0.0.0", "::") else check_host(args.host), "port": args.port, "insecure": bool(args.insecure),
               "certs": None if args.insecure else str(Path(args.certs).resolve()),
               "client_keys": None if args.insecure else str(Path(args.client_keys).resolve())}
    return config, options, network


def _check_network(network: dict[str, Any], clients: int) -> list[Path]:
    """The public keys to register; clear errors for missing certificates or keys."""
    if network["insecure"]:
        return []
    certs = Path(network["certs"])
    missing = [name for name in ("ca.crt", "server.crt", "server.key") if not (certs / name).is_file()]
    if missing:
        raise ValueError(f"--certs {certs}: {', '.join(missing)} missing (create them with `fedtune certs --out {certs} --host NAME`)")
    keys_dir = Path(network["client_keys"])
    keys = sorted(keys_dir.glob("*.pub")) if keys_dir.is_dir() else []
    if not keys:
        raise ValueError(f"--client-keys {keys_dir}: no *.pub files (each client makes one with `fedtune keys` and sends you the .pub file)")
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
            raise ValueError(f"--port {port} on {host} is not available ({err.strerror}); is another server running?") from None


def _check_eval_data(config: RunConfig) -> None:
    """The evaluation split loads and a local model folder exists (what the ServerApp will need)."""
    from fedtune.data import load_glue

    if config.model and config.model.startswith(("/", "./", "../", "~")) and not Path(config.model).expanduser().is_dir():
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
        "project": {"name": "fedtune-deployment", "version": "1.0.0", "description": "fedtune ServerApp and ClientApp (installed package)",
                    "license": "Apache-2.0", "dependencies": []},
        "tool": {"flwr": {"app": {"publisher": "fedtune",
                                  "components": {"serverapp": "fedtune.server.app:app", "clientapp": "fedtune.client.app:app"},
                                  "config": {**config.to_flower(), **options.to_flower()}}}},
    }
    return atomic_write_text(folder / "pyproject.toml", tomli_w.dumps(document))


# -- the command -----------------------------------------------------------------------------
def _warn_insecure() -> None:
    bar = "!" * 78
    print(f"{bar}\n!! --insecure: NO TLS and NO client authentication. Everything, including model updates, travels\n"
          f"!! in clear text, and ANY machine that reaches this port can join as a client. Local experiments only.\n{bar}",
          file=sys.stderr)


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
            print(f"round {row['round']}: {metric} {float(row[metric]):.4f}, epsilon (certified, max) {eps_text}, "
                  f"{row['clients_trained']} client(s), {row['clients_rejected']} rejected, {float(row['seconds']):.1f} s", flush=True)
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
        atomic_write_json(out / "config.json", config.to_dict())  # `--resume OUT` works even if the server dies before round 1
    write_app(paths.app, config, options)
    (out / "summary.json").unlink(missing_ok=True)

    def _terminate(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _terminate)
    server = FlowerServer(paths, network["host"], int(network["port"]), None if network["insecure"] else Path(network["certs"]))
    try:
        return _run(server, keys, config, options, network, paths, as_json=args.json)
    except ProcessFailed as err:
        print(f"fedtune: error: {err}", file=sys.stderr)
        return 1
    finally:
        server.stop()
        signal.signal(signal.SIGTERM, previous)


def _run(server: FlowerServer, keys: list[Path], config: RunConfig, options: DeployOptions, network: dict[str, Any],
         paths: ServerPaths, *, as_json: bool) -> int:
    """Start the SuperLink, register the keys, submit the run and follow it to its end."""
    from fedtune.report import format_summary

    out = config.out_dir
    server.start_superlink()
    for key in keys:  # before the gateway opens: a client must never find its key missing
        print(f"client key {key.name}: {server.register(key)}", flush=True)
    server.start_gateway()
    where = f"{network['host']}:{network['port']}"
    print(f"SuperLink ready; clients connect to {where} ({'NO TLS' if server.insecure else 'TLS, registered keys only'}); "
          f"logs in {paths.logs}", flush=True)
    run_id = server.submit()
    print(f"{'resumed' if options.resume else 'started'} run {run_id}: {config.clients} clients, {config.rounds} rounds, "
          f"min-clients {options.quorum(config.clients)}", flush=True)
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
        print(f"fedtune: error: run {run_id} ended as {status} without a summary{': ' + cause if cause else ''}; see {log_file}",
              file=sys.stderr)
        return 1
    summary = read_json(summary_path)
    print(json.dumps(summary, indent=2) if as_json else "\n" + format_summary(summary))
    print(f"\noutputs in {out}/: summary.json, metrics.csv, plot.png, ledger.json, checkpoint/, adapter/; logs in {paths.logs}")
    if summary.get("stop_reason"):
        print(f"fedtune: the run stopped early: {summary['stop_reason']}", file=sys.stderr)
        return 1
    return 0
