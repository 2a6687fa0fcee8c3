"""Run outputs a person and a machine can read: ``summary.json``, ``metrics.csv``, ``plot.png``, a table."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

from fedtune.io import atomic_write_bytes, atomic_write_json, atomic_write_text, jsonable

__all__ = ["write_metrics_csv", "write_summary", "plot_rounds", "format_summary"]


def write_metrics_csv(path: str | Path, rounds: list[dict[str, Any]]) -> Path:
    """One row per round, columns in first-seen order."""
    columns: list[str] = []
    for row in rounds:
        columns += [k for k in row if k not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    for row in rounds:
        writer.writerow(jsonable(row))
    return atomic_write_text(path, buffer.getvalue())


def write_summary(path: str | Path, summary: dict[str, Any]) -> Path:
    """``summary.json`` (infinities written as strings)."""
    return atomic_write_json(path, summary)


def plot_rounds(path: str | Path, rounds: list[dict[str, Any]], *, metric: str, title: str) -> Path:
    """Accuracy (or the task metric) and certified epsilon per round, as a PNG."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r["round"] for r in rounds]
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    ax.plot(xs, [float(r.get(metric, math.nan)) for r in rounds], "o-", color="tab:blue", label=metric)
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_ylabel(metric, color="tab:blue")
    ax.grid(alpha=0.3)
    eps = [float(r.get("epsilon_certified", math.nan)) for r in rounds]  # "inf" read back from JSON too
    if any(math.isfinite(e) for e in eps):
        ax2 = ax.twinx()
        ax2.plot(xs, eps, "s--", color="tab:red", label="epsilon (certified, max over clients)")
        ax2.set_ylabel("epsilon (certified, max over clients)", color="tab:red")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return atomic_write_bytes(path, buffer.getvalue())


def format_summary(summary: dict[str, Any]) -> str:
    """The human table printed at the end of a run."""
    metric = summary.get("metric", "accuracy")
    lines = [f"{'round':>5}  {metric:>10}  {'epsilon (certified)':>20}  {'seconds':>8}"]
    for r in summary["rounds"]:
        lines.append(f"{r['round']:>5}  {r.get(metric, math.nan):>10.4f}  {_fmt(r.get('epsilon_certified')):>20}  {r.get('seconds', 0.0):>8.1f}")
    lines.append("")
    mixes = {str(s["client"]): s["label_counts"] for s in summary.get("partition", {}).get("shards", [])}
    lines.append(f"{'client':>6}  {'examples':>8}  {'steps':>6}  {'epsilon (estimate)':>18}  {'epsilon (certified)':>19}  labels")
    for c in summary["clients"]:
        mix = " ".join(f"{k}:{v}" for k, v in mixes.get(str(c["id"]), {}).items())
        lines.append(f"{c['id']:>6}  {c['examples']:>8}  {c['steps']:>6}  {_fmt(c['epsilon']):>18}  {_fmt(c['epsilon_certified']):>19}  {mix}")
    lines.append("")
    lines.append(f"composed record-level epsilon (max over clients, certified, delta {summary['delta']:g}): {_fmt(summary['composed_epsilon'])}")
    lines.append(f"final {metric}: {summary['final_accuracy']:.4f}   total time: {summary['seconds']:.1f} s")
    for note in summary.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    return "inf" if math.isinf(value) else f"{value:.4f}"
