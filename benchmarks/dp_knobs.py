"""Which knobs close the gap between DP and non-private fine-tuning? (issue 4, item 4)

Runs ``fedtune centralized`` (or ``fedtune simulate`` with ``--federated``) once per knob setting on
the same data, at one epsilon, and tabulates the final task metric, the certified epsilon and the
time. Each run is a separate process with its own output folder under ``--work``; finished runs are
reused, so an interrupted sweep continues.

Example (the sweep in docs/results.md)::

    python benchmarks/dp_knobs.py --epsilon 8 --max-train-examples 3000 --rounds 3 \\
        --knobs "batch=64 lr=2e-3 rank=8" "batch=128 lr=5e-3 rank=8" "batch=128 lr=5e-3 rank=1"

Writes ``benchmarks/results/dp_knobs.{json,csv,md}``.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import io
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
KNOBS = {
    "batch": "--batch-size",
    "lr": "--learning-rate",
    "rank": "--lora-rank",
    "alpha": "--lora-alpha",
    "clip": "--max-grad-norm",
    "rounds": "--rounds",
    "epochs": "--local-epochs",
    "targets": "--lora-targets",
    "eps": "--epsilon",
    "opt": "--optimizer",
    "mom": "--momentum",
    "wd": "--weight-decay",
    "sched": "--lr-schedule",
    "warm": "--warmup-fraction",
    "steps": "--local-steps",
    "prec": "--precision",
    "sopt": "--server-optimizer",
    "slr": "--server-learning-rate",
    "smom": "--server-momentum",
    "clients": "--clients",
    "part": "--partition",
    "seed": "--seed",
    # on/off switches: NAME=1 or NAME=0
    "stateful": "--stateful-clients",
    "ffa": "--ffa-lora",
}
FLAGS = {"stateful", "ffa"}
FEDERATED_ONLY = {"sopt", "slr", "smom", "clients", "part"}


def parse_knobs(text: str) -> dict[str, str]:
    """``"batch=128 lr=5e-3"`` -> {"batch": "128", "lr": "5e-3"} (unknown names are refused)."""
    knobs = {}
    for item in text.split():
        name, sep, value = item.partition("=")
        if not sep or name not in KNOBS:
            raise SystemExit(f"bad knob {item!r}: use NAME=VALUE with NAME in {', '.join(KNOBS)}")
        if name in FLAGS and value not in ("0", "1"):
            raise SystemExit(f"bad knob {item!r}: {name} is a switch, use {name}=1 or {name}=0")
        knobs[name] = value
    return knobs


def knob_args(knobs: dict[str, str], federated: bool) -> list[str]:
    """Command-line options for ``knobs`` (switches become --X / --no-X)."""
    out: list[str] = []
    for key, value in knobs.items():
        if key in FEDERATED_ONLY and not federated:
            raise SystemExit(f"knob {key} only applies to federated runs (--federated)")
        if key in FLAGS:
            flag = KNOBS[key]
            out.append(flag if value == "1" else "--no-" + flag[2:])
        else:
            out += [KNOBS[key], value]
    return out


def run(knobs: dict[str, str], args: argparse.Namespace, work: Path) -> dict[str, Any]:
    name = "_".join(f"{k}{v}" for k, v in knobs.items()).replace(",", "+") or "defaults"
    if args.federated:
        name = f"federated{args.clients}-{args.partition.replace(':', '')}_{name}"
    out = work / name
    summary_path = out / "summary.json"
    cmd = [
        sys.executable,
        "-m",
        "fedtune.cli",
        "simulate" if args.federated else "centralized",
        "--task",
        args.task,
        "--epsilon",
        args.epsilon,
        "--delta",
        args.delta,
        "--rounds",
        str(args.rounds),
        "--max-train-examples",
        str(args.max_train_examples) if args.max_train_examples else "none",
        "--out",
        str(out),
    ]
    if "seed" not in knobs:
        cmd += ["--seed", str(args.seed)]
    if args.max_eval_examples:
        cmd += ["--max-eval-examples", str(args.max_eval_examples)]
    if args.data_dir:
        cmd += ["--data-dir", args.data_dir]
    if args.federated:
        if "clients" not in knobs:
            cmd += ["--clients", str(args.clients)]
        if "part" not in knobs:
            cmd += ["--partition", args.partition]
    cmd += [*shlex.split(args.extra), *knob_args(knobs, args.federated)]
    if not summary_path.exists():
        resume = (out / "checkpoint" / "state.json").exists()
        if resume:
            cmd = [*cmd[: cmd.index("--out")], "--resume", str(out)]
        print(f"{name}: {' '.join(cmd[2:])}", flush=True)
        started = time.time()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr[-2000:], file=sys.stderr)
            return {"name": name, **knobs, "status": f"failed ({proc.returncode})"}
        print(f"  done in {time.time() - started:.0f} s", flush=True)
    summary = json.loads(summary_path.read_text())
    metric = summary["metric"]
    return {
        "name": name,
        "eps": args.epsilon,
        **knobs,
        "metric": metric,
        "initial": summary["rounds"][0][metric],
        "final": summary["final_accuracy"],
        "best": max(r[metric] for r in summary["rounds"]),
        "per_round": [round(r[metric], 4) for r in summary["rounds"]],
        "epsilon_certified": summary["composed_epsilon"],
        "seconds": summary["seconds"],
        "status": "ok",
        "command": "fedtune " + " ".join(c for c in cmd[3:]),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--knobs", nargs="+", required=True, help='one quoted setting per run, e.g. "batch=128 lr=5e-3 rank=1"'
    )
    p.add_argument("--task", default="sst2")
    p.add_argument("--epsilon", default="8")
    p.add_argument("--delta", default="1e-5")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-train-examples", type=int, default=3000, help="0 = the whole training set")
    p.add_argument("--extra", default="", help='more fedtune options for every run, e.g. "--batch-size 1024"')
    p.add_argument("--max-eval-examples", type=int, default=0, help="0 = the whole dev set")
    p.add_argument("--data-dir", default=os.environ.get("FEDTUNE_DATA_DIR"))
    p.add_argument("--federated", action="store_true", help="run fedtune simulate instead of centralized")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--partition", default="iid")
    p.add_argument("--work", default="runs/dp_knobs")
    p.add_argument("--name", default="dp_knobs")
    args = p.parse_args(argv)
    settings = [parse_knobs(k) for k in args.knobs]
    work = Path(args.work)
    rows: list[dict[str, Any]] = []
    for knobs in settings:
        rows.append(run(knobs, args, work))
        write_tables(rows, settings, args, argv)
    return 0


def write_tables(
    rows: list[dict[str, Any]], settings: list[dict[str, str]], args: argparse.Namespace, argv: list[str] | None
) -> None:
    """Write the rows so far (each finished run lands on disk before the next starts)."""
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    date = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    command = "python benchmarks/dp_knobs.py " + " ".join(
        f'"{a}"' if " " in a else a for a in (argv if argv is not None else sys.argv[1:])
    )
    (results / f"{args.name}.json").write_text(json.dumps({"date": date, "command": command, "rows": rows}, indent=2))
    columns = ["name", *KNOBS, "metric", "initial", "final", "best", "epsilon_certified", "seconds", "status"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    (results / f"{args.name}.csv").write_text(buffer.getvalue())
    used = [k for k in KNOBS if any(k in r for r in rows) and (k != "eps" or any("eps" in s for s in settings))]
    lines = [
        f"Date: {date}  ",
        f"Command: `{command}`",
        "",
        "| " + " | ".join([*used, "metric per round", "final", "certified epsilon", "seconds"]) + " |",
        "|" + "---|" * (len(used) + 4),
    ]
    for r in rows:
        if r["status"] != "ok":
            lines.append("| " + " | ".join([*(r.get(k, "") for k in used), r["status"], "", "", ""]) + " |")
            continue
        eps = r["epsilon_certified"]
        lines.append(
            "| "
            + " | ".join(
                [
                    *(r.get(k, "") for k in used),
                    " → ".join(f"{v:.3f}" for v in r["per_round"]),
                    f"{r['final']:.4f}",
                    eps if isinstance(eps, str) else f"{eps:.3f}",
                    f"{r['seconds']:.0f}",
                ]
            )
            + " |"
        )
    (results / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    sys.exit(main())
