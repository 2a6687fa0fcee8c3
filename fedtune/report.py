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


def plot_rounds(
    path: str | Path,
    rounds: list[dict[str, Any]],
    *,
    metric: str,
    title: str,
    majority: float | None = None,
    epsilon_target: float | None = None,
    client_level_target: float | None = None,
) -> Path:
    """Accuracy (or the task metric) and certified epsilon per round, as a PNG.

    ``majority`` draws the majority-class rate (what a model that learned nothing scores) and
    ``epsilon_target`` the privacy budget, as dotted lines. Rows with ``client_level_epsilon``
    add the client-level epsilon (server noise, certified) in purple, with its budget
    ``client_level_target``.
    """
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
    if majority is not None and math.isfinite(majority) and metric == "accuracy":
        ax.axhline(majority, color="tab:gray", linestyle=":", label=f"majority class {majority:.3f}")
        ax.legend(loc="lower right", fontsize=8)
    eps = [float(r.get("epsilon_certified", math.nan)) for r in rounds]  # "inf" read back from JSON too
    if any(math.isfinite(e) for e in eps):
        ax2 = ax.twinx()
        ax2.plot(xs, eps, "s--", color="tab:red", label="epsilon (certified, max over clients)")
        ax2.set_ylabel("epsilon (certified, max over clients)", color="tab:red")
        if epsilon_target is not None and math.isfinite(epsilon_target):
            ax2.axhline(epsilon_target, color="tab:red", linestyle=":", alpha=0.6)
            ax2.annotate(
                f"budget {epsilon_target:g}",
                (xs[0], epsilon_target),
                color="tab:red",
                fontsize=8,
                textcoords="offset points",
                xytext=(2, 3),
            )
            ax2.set_ylim(0, max(epsilon_target, max(e for e in eps if math.isfinite(e))) * 1.1)
    client = [float(r.get("client_level_epsilon", math.nan)) for r in rounds]
    if any(math.isfinite(e) for e in client):
        ax3 = ax.twinx()
        ax3.spines["right"].set_position(("axes", 1.12))
        ax3.plot(xs, client, "^-.", color="tab:purple", label="client-level epsilon (certified)")
        ax3.set_ylabel("client-level epsilon (certified)", color="tab:purple")
        top = max(e for e in client if math.isfinite(e))
        if client_level_target is not None and math.isfinite(client_level_target):
            ax3.axhline(client_level_target, color="tab:purple", linestyle=":", alpha=0.6)
            top = max(top, client_level_target)
        ax3.set_ylim(0, top * 1.1 or 1.0)
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
        lines.append(
            f"{r['round']:>5}  {r.get(metric, math.nan):>10.4f}  "
            f"{_fmt(r.get('epsilon_certified')):>20}  {r.get('seconds', 0.0):>8.1f}"
        )
    lines.append("")
    mixes = {str(s["client"]): s["label_counts"] for s in summary.get("partition", {}).get("shards", [])}
    lines.append(
        f"{'client':>6}  {'examples':>8}  {'q':>7}  {'sigma':>7}  {'steps':>6}  {'epsilon (estimate)':>18}  "
        f"{'epsilon (certified)':>19}  labels"
    )
    for c in summary["clients"]:
        mix = " ".join(f"{k}:{v}" for k, v in mixes.get(str(c["id"]), {}).items())
        q, sigma = c.get("sampling_rate"), c.get("noise_multiplier")
        lines.append(
            f"{c['id']:>6}  {c['examples']:>8}  {_num(q):>7}  {_num(sigma):>7}  "
            f"{c['steps']:>6}  {_fmt(c['epsilon']):>18}  "
            f"{_fmt(c['epsilon_certified']):>19}  {mix}"
        )
    lines.append(
        "(q: Poisson sampling rate B/N; sigma: noise multiplier, 0 = no DP; steps: DP-SGD steps over all rounds)"
    )
    lines.append("")
    lines.append(
        f"composed record-level epsilon (max over clients, certified, delta {summary['delta']:g}): "
        f"{_fmt(summary['composed_epsilon'])}"
    )
    if "client_level_epsilon" in summary:
        level = summary.get("client_level", {})
        lines.append(
            f"client-level epsilon (server noise over {level.get('server_releases', '?')} rounds, q = "
            f"{_num(level.get('sampling_rate'))}, sigma {_num(level.get('noise_multiplier'))}, update clipping "
            f"{_num(level.get('clipping_norm'))}, certified, delta {summary['delta']:g}): "
            f"{_fmt(summary['client_level_epsilon'])}"
        )
    lines.append(f"final {metric}: {summary['final_accuracy']:.4f}   total time: {summary['seconds']:.1f} s")
    majority = summary.get("majority_class_rate")
    if isinstance(majority, (int, float)) and math.isfinite(majority) and metric == "accuracy":
        lines.append(f"majority-class rate of the evaluation split: {majority:.4f} (a model that learned nothing)")
    if summary.get("stop_reason"):
        lines.append(f"stopped early: {summary['stop_reason']}")
    for note in summary.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)


def _num(value: Any) -> str:
    return "-" if not isinstance(value, (int, float)) else f"{value:.4g}"


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    return "inf" if math.isinf(value) else f"{value:.4f}"
