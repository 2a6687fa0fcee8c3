"""The client side's commands: ``fedtune keys``, ``fedtune partition`` and ``fedtune client``.

A networked run, from two empty machines to results, is described in ``docs/deployment.md``.
"""

from __future__ import annotations

import argparse
import json

from fedtune.cliargs import epsilon_arg, optional_int_arg
from fedtune.client import deploy

__all__ = ["add_parsers"]


def _keys(args: argparse.Namespace) -> int:
    from fedtune.deployment import create_client_keys

    files = create_client_keys(args.out, args.name, force=args.force)
    print(f"SuperNode key pair for client {args.name!r}:")
    print(
        f"  {files.private_key}      private: stays on this machine (`fedtune client --auth-key {files.private_key}`)"
    )
    print(f"  {files.public_key}  public: send it to the server operator (into `fedtune server --client-keys DIR`)")
    return 0


def _partition(args: argparse.Namespace) -> int:
    from fedtune.data.shards import write_shards

    infos = write_shards(
        args.task,
        args.clients,
        args.out,
        data_dir=args.data_dir,
        partition=args.partition,
        seed=args.seed,
        max_train_examples=args.max_train_examples,
        force=args.force,
    )
    if args.json:
        print(
            json.dumps([{"name": i.name, "path": str(i.path.parent), "examples": i.examples} for i in infos], indent=2)
        )
        return 0
    print(
        f"{args.task}: {sum(i.examples for i in infos):,} training examples in {len(infos)} shard(s) "
        f"({args.partition}, seed {args.seed})"
    )
    for info in infos:
        print(f"  {info.path.parent}  {info.examples:>7,} examples")
    for note in infos[0].notes if infos else []:
        print(f"note: {note}")
    print("copy one client-K folder to each client machine (`fedtune client --data client-K`)")
    return 0


def _add_client(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "client",
        help="join a federation as a client, training on this machine's data only",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    p.add_argument(
        "--superlink",
        required=True,
        metavar="HOST:PORT",
        help="the server's address (its `fedtune server --host/--port`)",
    )
    p.add_argument(
        "--data",
        required=True,
        metavar="PATH",
        help="this client's data: a `fedtune partition` client folder or a parquet file",
    )
    p.add_argument(
        "--epsilon",
        type=epsilon_arg,
        required=True,
        help="this client's record-level budget over the whole run ('inf': no DP)",
    )
    p.add_argument(
        "--delta", type=float, default=1e-5, help="this client's delta (default 1e-05; must be below 1 / examples)"
    )
    p.add_argument("--client-id", default=None, help="stable name in both ledgers (default: the data folder's name)")
    p.add_argument(
        "--state-dir",
        default=None,
        help="folder for the client's ledger, stored updates and optimizer state (default DATA/state)",
    )
    p.add_argument(
        "--root-certificates",
        metavar="CA_CRT",
        default=None,
        help="the server's CA certificate (ca.crt from `fedtune certs`)",
    )
    p.add_argument(
        "--auth-key",
        metavar="KEY",
        default=None,
        help="this client's private key from `fedtune keys` (its .pub is registered on the server)",
    )
    p.add_argument(
        "--accountant", default="saddlepoint", help="estimating accountant (default saddlepoint; pld certifies)"
    )
    p.add_argument(
        "--max-wait-time",
        type=float,
        default=None,
        help="give up after this many seconds without the server (default: keep trying)",
    )
    p.add_argument(
        "--require-secure-aggregation",
        action="store_true",
        help="train only in SecAgg+ rounds (the server sees only the sum of the updates); a plaintext round is "
        "refused with a reason (the server needs --secure-aggregation)",
    )
    p.add_argument("--insecure", action="store_true", help="NO TLS and NO authentication: local experiments only")
    p.set_defaults(handler=lambda args: deploy.run_client(args))


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    """Register ``keys``, ``partition`` and ``client``."""
    keys = subparsers.add_parser(
        "keys", help="create a client's authentication key pair (run it on the client machine)"
    )
    keys.add_argument("--out", required=True, help="folder for NAME (private) and NAME.pub (public)")
    keys.add_argument("--name", required=True, help="the client's name (letters, digits, '_', '.', '-')")
    keys.add_argument("--force", action="store_true", help="replace an existing key pair (re-register the new .pub)")
    keys.set_defaults(handler=_keys)

    part = subparsers.add_parser(
        "partition", help="split a GLUE task into per-client shard folders (for demos and tests)"
    )
    part.add_argument("--task", default="sst2", help="GLUE task (default sst2)")
    part.add_argument("--clients", type=int, required=True, help="number of shards")
    part.add_argument("--out", required=True, help="folder for client-0/, client-1/, ... and partition.json")
    part.add_argument("--data-dir", default=None, help="local GLUE folder (default $FEDTUNE_DATA_DIR, else the hub)")
    part.add_argument("--partition", default="iid", help="iid, dirichlet or dirichlet:ALPHA (default iid)")
    part.add_argument("--seed", type=int, default=0, help="seed of the subset and the split (default 0)")
    part.add_argument(
        "--max-train-examples", type=optional_int_arg, default=None, help="seeded subset of the training set first"
    )
    part.add_argument("--force", action="store_true", help="overwrite shards already in --out")
    part.add_argument("--json", action="store_true", help="print the shards as JSON")
    part.set_defaults(handler=_partition)

    _add_client(subparsers)
