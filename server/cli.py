"""The server side's commands: ``fedtune certs`` (TLS for the SuperLink) and ``fedtune server``.

A networked run, from two empty machines to results, is described in ``docs/deployment.md``.
"""

from __future__ import annotations

import argparse

from fedtune.cliargs import add_run_options
from fedtune.protocol import DeployOptions
from fedtune.server import deploy

__all__ = ["add_parsers"]


def _certs(args: argparse.Namespace) -> int:
    from fedtune.deployment import create_certificates

    files = create_certificates(args.out, args.host, days=args.days, force=args.force)
    print(f"development CA and server certificate for {', '.join(files.hosts)} (valid {args.days} days):")
    print(f"  {files.ca_cert}      copy to every client (--root-certificates)")
    print(f"  {files.ca_key}      keep on this machine only")
    print(f"  {files.server_cert}  {files.server_key}   used by `fedtune server --certs {args.out}`")
    return 0


def _add_server(subparsers: argparse._SubParsersAction) -> None:
    o = DeployOptions()
    p = subparsers.add_parser(
        "server",
        help="run the server of a networked federation (Flower SuperLink + the fedtune ServerApp)",
        description=deploy.__doc__.split("\n\n")[1] if deploy.__doc__ else None,
    )
    run = p.add_argument_group("run settings (as for fedtune simulate; the clients hold the training data)")
    add_run_options(run, federated=True, deployed=True, out="runs/server")
    net = p.add_argument_group("network and security")
    net.add_argument(
        "--host", default="0.0.0.0", help="address the clients connect to (default 0.0.0.0: every interface)"
    )
    net.add_argument(
        "--port",
        type=int,
        default=deploy.DEFAULT_PORT,
        help=f"port the clients connect to (default {deploy.DEFAULT_PORT})",
    )
    net.add_argument(
        "--certs",
        default="certs",
        help="folder with ca.crt, server.crt, server.key from `fedtune certs` (default certs)",
    )
    net.add_argument(
        "--client-keys",
        default="client-keys",
        help="folder of the clients' *.pub keys to register (default client-keys)",
    )
    net.add_argument(
        "--insecure", action="store_true", help="NO TLS and NO client authentication: local experiments only"
    )
    faults = p.add_argument_group("faults")
    faults.add_argument(
        "--min-clients", type=int, default=o.min_clients, help="valid updates a round needs (default 0: all --clients)"
    )
    faults.add_argument(
        "--round-retries",
        type=int,
        default=o.round_retries,
        help=f"retries of a round short of --min-clients (default {o.round_retries})",
    )
    faults.add_argument(
        "--round-timeout",
        type=float,
        default=o.round_timeout,
        help=f"seconds to wait for a round's replies (default {o.round_timeout:g})",
    )
    faults.add_argument(
        "--wait-timeout",
        type=float,
        default=o.wait_timeout,
        help=f"seconds to wait for clients to connect (default {o.wait_timeout:g})",
    )
    faults.add_argument(
        "--noise-multiplier",
        type=float,
        default=0.0,
        help="ask every client for this sigma (default 0: each client calibrates for its own budget)",
    )
    p.set_defaults(handler=lambda args: deploy.serve(args))


def _stop_local(args: argparse.Namespace) -> int:
    from fedtune.server.superlink import local_superlink_port, stop_local_superlink

    port = args.port or local_superlink_port()
    stopped = stop_local_superlink(port)
    if stopped:
        print(
            f"stopped the local SuperLink on 127.0.0.1:{port} (process {', '.join(map(str, stopped))}) and its helpers"
        )
    else:
        print(f"no local SuperLink of `flwr run` is serving 127.0.0.1:{port}")
    return 0


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    """Register ``certs``, ``server`` and ``stop-local-superlink``."""
    certs = subparsers.add_parser("certs", help="create a development CA and a TLS certificate for the server")
    certs.add_argument("--out", required=True, help="folder for ca.crt, ca.key, server.crt, server.key")
    certs.add_argument(
        "--host",
        action="append",
        default=[],
        metavar="NAME",
        help="DNS name or IP address clients use to reach the server "
        "(repeatable; localhost and 127.0.0.1 are always included)",
    )
    certs.add_argument("--days", type=int, default=365, help="validity in days (default 365)")
    certs.add_argument("--force", action="store_true", help="replace existing files (clients then need the new ca.crt)")
    certs.set_defaults(handler=_certs)

    _add_server(subparsers)
    stop = subparsers.add_parser(
        "stop-local-superlink",
        help="stop the SuperLink `flwr run .` leaves running for local simulations (only that one)",
    )
    stop.add_argument("--port", type=int, default=None, help="its port (default: Flower's, 39091)")
    stop.set_defaults(handler=_stop_local)
