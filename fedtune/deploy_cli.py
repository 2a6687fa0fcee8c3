"""The deployment commands: ``certs``, ``keys``, ``partition``, ``server`` and ``client``.

A networked run, from two empty machines to results, is described in ``docs/deployment.md``.
"""

from __future__ import annotations

import argparse
import json

__all__ = ["add_deploy_parsers"]


def _certs(args: argparse.Namespace) -> int:
    from fedtune.certs import create_certificates

    files = create_certificates(args.out, args.host, days=args.days, force=args.force)
    print(f"development CA and server certificate for {', '.join(files.hosts)} (valid {args.days} days):")
    print(f"  {files.ca_cert}      copy to every client (--root-certificates)")
    print(f"  {files.ca_key}      keep on this machine only")
    print(f"  {files.server_cert}  {files.server_key}   used by `fedtune server --certs {args.out}`")
    return 0


def _keys(args: argparse.Namespace) -> int:
    from fedtune.certs import create_client_keys

    files = create_client_keys(args.out, args.name, force=args.force)
    print(f"SuperNode key pair for client {args.name!r}:")
    print(f"  {files.private_key}      private: stays on this machine (`fedtune client --auth-key {files.private_key}`)")
    print(f"  {files.public_key}  public: send it to the server operator (into `fedtune server --client-keys DIR`)")
    return 0


def _partition(args: argparse.Namespace) -> int:
    from fedtune.data.shards import write_shards

    infos = write_shards(args.task, args.clients, args.out, data_dir=args.data_dir, partition=args.partition, seed=args.seed,
                         max_train_examples=args.max_train_examples, force=args.force)
    if args.json:
        print(json.dumps([{"name": i.name, "path": str(i.path.parent), "examples": i.examples} for i in infos], indent=2))
        return 0
    print(f"{args.task}: {sum(i.examples for i in infos):,} training examples in {len(infos)} shard(s) ({args.partition}, seed {args.seed})")
    for info in infos:
        print(f"  {info.path.parent}  {info.examples:>7,} examples")
    for note in infos[0].notes if infos else []:
        print(f"note: {note}")
    print("copy one client-K folder to each client machine (`fedtune client --data client-K`)")
    return 0


def _optional_int(text: str) -> int | None:
    return None if text.lower() in ("", "none", "all") else int(text)


def add_deploy_parsers(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register the deployment commands."""
    from fedtune.client.deploy import add_client_parser
    from fedtune.server.deploy import add_server_parser

    certs = subparsers.add_parser("certs", help="create a development CA and a TLS certificate for the server")
    certs.add_argument("--out", required=True, help="folder for ca.crt, ca.key, server.crt, server.key")
    certs.add_argument("--host", action="append", default=[], metavar="NAME",
                       help="DNS name or IP address clients use to reach the server (repeatable; localhost and 127.0.0.1 are always included)")
    certs.add_argument("--days", type=int, default=365, help="validity in days (default 365)")
    certs.add_argument("--force", action="store_true", help="replace existing files (clients then need the new ca.crt)")
    certs.set_defaults(handler=_certs)

    keys = subparsers.add_parser("keys", help="create a client's authentication key pair (run it on the client machine)")
    keys.add_argument("--out", required=True, help="folder for NAME (private) and NAME.pub (public)")
    keys.add_argument("--name", required=True, help="the client's name (letters, digits, '_', '.', '-')")
    keys.add_argument("--force", action="store_true", help="replace an existing key pair (re-register the new .pub)")
    keys.set_defaults(handler=_keys)

    part = subparsers.add_parser("partition", help="split a GLUE task into per-client shard folders (for demos and tests)")
    part.add_argument("--task", default="sst2", help="GLUE task (default sst2)")
    part.add_argument("--clients", type=int, required=True, help="number of shards")
    part.add_argument("--out", required=True, help="folder for client-0/, client-1/, ... and partition.json")
    part.add_argument("--data-dir", default=None, help="local GLUE folder (default $FEDTUNE_DATA_DIR, else the hub)")
    part.add_argument("--partition", default="iid", help="iid, dirichlet or dirichlet:ALPHA (default iid)")
    part.add_argument("--seed", type=int, default=0, help="seed of the subset and the split (default 0)")
    part.add_argument("--max-train-examples", type=_optional_int, default=None, help="seeded subset of the training set first")
    part.add_argument("--force", action="store_true", help="overwrite shards already in --out")
    part.add_argument("--json", action="store_true", help="print the shards as JSON")
    part.set_defaults(handler=_partition)

    add_server_parser(subparsers)
    add_client_parser(subparsers)
