"""Empirical privacy audit at several epsilons (issue 12, item 3): ``fedtune audit`` per epsilon, one table.

Runs ``fedtune audit`` once per epsilon (default inf, 8 and 1) with the same data, canaries and
settings, each in its own folder under ``--work`` (a finished audit is reused, an interrupted one
resumed), and tabulates the empirical epsilon lower bound next to the certified epsilon, the one-run
guesses and the membership attack. The lower bound must never exceed the certified epsilon; at
epsilon inf the audit should detect leakage.

Example (the default sizes: the quickstart's federation, 1,000 canaries; about 20 minutes on 2 cores)::

    python benchmarks/audit.py --epsilons inf,8,1 --clients 4 --rounds 6 --max-train-examples 40000 \\
        --canaries 1000 --extra "--precision bf16"

With one epoch (the default recipe) each canary is seen about once; if the inf row shows 0 the audit
has no power at these settings, and more passes (``--extra "--epochs 3"``) make memorisation, and so
detection, likelier. The toy check in docs/privacy.md used ``--epochs 10``. The command exits with 1
if an audit failed or a lower bound exceeds its certified epsilon.

Writes ``benchmarks/results/NAME.{json,csv,md}`` (``--name``, default ``audit``; ``--results`` for
another folder).
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import io
import json
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
COLUMNS = [
    "epsilon",
    "certified_epsilon",
    "empirical_epsilon",
    "within_certified",
    "leakage_detected",
    "guesses",
    "correct",
    "canaries",
    "included",
    "mia_auc",
    "mia_tpr_at_1pct_fpr",
    "final_accuracy",
    "seconds",
    "status",
]


def audit_once(epsilon: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Run (or reuse, or resume) the audit at ``epsilon``; one row of the table."""
    out = work / f"eps{epsilon}"
    cmd = [sys.executable, "-m", "fedtune.cli", "audit"]
    if (out / "audit" / "canaries.json").exists() and not (out / "audit.json").exists():
        cmd += ["--resume", str(out)]  # interrupted: the same canaries, the run continues
    else:
        cmd += [
            "--task",
            args.task,
            "--epsilon",
            epsilon,
            "--delta",
            args.delta,
            "--clients",
            str(args.clients),
            "--rounds",
            str(args.rounds),
            "--max-train-examples",
            str(args.max_train_examples),
            "--canaries",
            str(args.canaries),
            "--confidence",
            str(args.confidence),
            "--seed",
            str(args.seed),
            "--out",
            str(out),
            *shlex.split(args.extra),
        ]
        if args.max_eval_examples:
            cmd += ["--max-eval-examples", str(args.max_eval_examples)]
        if args.data_dir:
            cmd += ["--data-dir", args.data_dir]
    if not (out / "audit.json").exists():
        print(f"epsilon {epsilon}: {' '.join(cmd[2:])}", flush=True)
        started = time.time()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr[-2000:], file=sys.stderr)
            return {"epsilon": epsilon, "status": f"failed ({proc.returncode})"}
        print(f"  done in {time.time() - started:.0f} s", flush=True)
    audit = json.loads((out / "audit.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    one, mia = audit["one_run"], audit["membership_inference"]
    return {
        "epsilon": epsilon,
        "certified_epsilon": float(audit["certified_epsilon"]),
        "empirical_epsilon": audit["empirical_epsilon"],
        "within_certified": audit["within_certified"],
        "leakage_detected": audit["leakage_detected"],
        "guesses": one["guesses"],
        "correct": one["correct"],
        "k_pos": one["k_pos"],
        "k_neg": one["k_neg"],
        "canaries": one["canaries"],
        "included": one["included"],
        "confidence": audit["confidence"],
        "mia_auc": mia["auc"],
        "mia_tpr_at_1pct_fpr": mia["tpr_at_fpr"],
        "final_accuracy": audit["final_accuracy"],
        "seconds": summary["seconds"],
        "status": "ok",
        "folder": str(out),
    }


def _cell(value: Any, digits: int = 3) -> str:
    if isinstance(value, float):
        return "inf" if math.isinf(value) else f"{value:.{digits}f}"
    return "" if value is None else str(value)


def write_tables(rows: list[dict[str, Any]], args: argparse.Namespace, argv: list[str] | None) -> None:
    """Write the rows so far (each finished audit lands on disk before the next starts)."""
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    date = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    command = "python benchmarks/audit.py " + " ".join(
        f'"{a}"' if " " in a else a for a in (argv if argv is not None else sys.argv[1:])
    )
    safe = [{k: ("inf" if isinstance(v, float) and math.isinf(v) else v) for k, v in r.items()} for r in rows]
    (results / f"{args.name}.json").write_text(json.dumps({"date": date, "command": command, "rows": safe}, indent=2))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(safe)
    (results / f"{args.name}.csv").write_text(buffer.getvalue())
    lines = [
        f"Date: {date}  ",
        f"Command: `{command}`",
        "",
        "| epsilon (target) | certified epsilon (client 0) | empirical epsilon (lower bound) | correct / guesses "
        "| canaries (included) | MIA AUC | MIA TPR at 1% FPR | accuracy | seconds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['epsilon']} | {r['status']} | | | | | | | |")
            continue
        lines.append(
            f"| {r['epsilon']} | {_cell(r['certified_epsilon'])} | **{_cell(r['empirical_epsilon'])}** "
            f"| {r['correct']} / {r['guesses']} | {r['canaries']} ({r['included']}) | {_cell(r['mia_auc'])} "
            f"| {_cell(r['mia_tpr_at_1pct_fpr'])} | {_cell(r['final_accuracy'])} | {_cell(r['seconds'], 0)} |"
        )
    bad = [r["epsilon"] for r in rows if r["status"] == "ok" and not r["within_certified"]]
    if bad:
        lines += ["", f"**The lower bound exceeds the certified epsilon at epsilon {', '.join(bad)}: investigate.**"]
    (results / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--epsilons", default="inf,8,1", help="comma-separated (default inf,8,1)")
    p.add_argument("--task", default="sst2")
    p.add_argument("--delta", default="1e-5")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--max-train-examples", type=int, default=40000, help="must leave unused examples for canaries")
    p.add_argument("--max-eval-examples", type=int, default=0, help="0 = the whole dev set")
    p.add_argument("--canaries", type=int, default=1000)
    p.add_argument("--confidence", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--extra", default="", help='more fedtune options for every run, e.g. "--precision bf16"')
    p.add_argument("--data-dir", default=os.environ.get("FEDTUNE_DATA_DIR"))
    p.add_argument("--work", default="runs/audit_bench")
    p.add_argument("--name", default="audit")
    p.add_argument("--results", default=str(HERE / "results"), help="folder of the tables")
    args = p.parse_args(argv)
    work = Path(args.work)
    rows: list[dict[str, Any]] = []
    for epsilon in (e.strip() for e in args.epsilons.split(",") if e.strip()):
        rows.append(audit_once(epsilon, args, work))
        write_tables(rows, args, argv)
    return 0 if all(r["status"] == "ok" and r["within_certified"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
