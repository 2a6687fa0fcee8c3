"""Outputs of ``fedtune compare``: ``results.{json,csv,md}``, the accuracy-epsilon plot and the
per-client epsilon spread. All written atomically (an interrupted grid keeps what it has)."""

from __future__ import annotations

import csv
import io
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedtune.io import atomic_write_bytes, atomic_write_json, atomic_write_text, jsonable
from fedtune.simulations.grid import GridSpec

__all__ = [
    "write_grid_outputs",
    "format_results_table",
    "plot_accuracy_vs_epsilon",
    "plot_epsilon_spread",
    "CSV_COLUMNS",
]

#: Columns of ``results.csv`` (per-client epsilons are in ``results.json``).
CSV_COLUMNS = (
    "cell",
    "seed",
    "setting",
    "partition",
    "clients",
    "epsilon_target",
    "delta",
    "epsilon_certified",
    "epsilon_estimate",
    "client_level_epsilon",
    "metric",
    "value",
    "accuracy",
    "initial_value",
    "rounds_completed",
    "examples_processed",
    "rejected_updates",
    "seconds",
    "status",
    "error",
)


def _num(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _eps(value: Any) -> str:
    v = _num(value)
    return "inf" if math.isinf(v) else ("n/a" if math.isnan(v) else f"{v:g}")


def _label(row: dict[str, Any]) -> str:
    return "centralized" if row["setting"] == "centralized" else f"federated {row['partition']}"


def _ok(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r.get("status") in ("ok", "stopped early")]


def _groups(rows: Sequence[dict[str, Any]]) -> dict[tuple[str, float], list[dict[str, Any]]]:
    """Finished rows grouped by (plot line, epsilon target), in first-seen order."""
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for row in _ok(rows):
        groups.setdefault((_label(row), _num(row["epsilon_target"])), []).append(row)
    return groups


def _spread(values: Sequence[float], digits: int) -> str:
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ({min(values):.{digits}f}–{max(values):.{digits}f})"


def format_results_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table, one line per (setting, epsilon): mean over seeds, min–max in brackets."""
    groups = _groups(rows)
    if not groups:
        return "(no finished cells yet)\n"
    metric = next(iter(groups.values()))[0]["metric"]
    seeds = sorted({int(r["seed"]) for r in _ok(rows)})
    lines = [
        f"| setting | epsilon target | certified epsilon reached | {metric} | vs non-private (same setting) "
        "| vs centralized (same epsilon) "
        "| examples processed | minutes | seeds |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    means = {key: statistics.fmean(_num(r["value"]) for r in g) for key, g in groups.items()}
    nonprivate = {label: v for (label, e), v in means.items() if math.isinf(e)}
    for (label, epsilon), group in groups.items():
        values = [_num(r["value"]) for r in group]
        certified = [_num(r["epsilon_certified"]) for r in group]
        cert = "— (no DP)" if math.isinf(epsilon) else _spread(certified, 3)
        gap = (
            ""
            if math.isinf(epsilon) or label not in nonprivate
            else f"{100 * (means[label, epsilon] - nonprivate[label]):+.1f} pts"
        )
        central = means.get(("centralized", epsilon))
        fed_gap = (
            "" if label == "centralized" or central is None else f"{100 * (means[label, epsilon] - central):+.1f} pts"
        )
        lines.append(
            f"| {label} | {_eps(epsilon)} | {cert} | {_spread(values, 4)} | {gap} | {fed_gap} | "
            f"{statistics.fmean(_num(r['examples_processed']) for r in group):,.0f} | "
            f"{statistics.fmean(_num(r['seconds']) for r in group) / 60:.1f} | {len(group)} |"
        )
    failed = [r for r in rows if r.get("status") in ("failed", "degraded")]
    notes = [
        f"Mean over seeds {', '.join(map(str, seeds))}"
        + (", min–max in brackets" if len(seeds) > 1 else "")
        + "; gaps compare means, in points (metric x 100)."
    ]
    notes += [
        f"{r['status'].upper()} (left out of the table and plots): {r['cell']}: {r.get('error', '')}" for r in failed
    ]
    return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"


def _x_positions(epsilons: Sequence[float]) -> tuple[dict[float, float], list[float], list[str]]:
    """x position of each budget on a log axis; ``inf`` sits one decade-ish right of the largest."""
    finite = sorted(e for e in set(epsilons) if math.isfinite(e))
    top = max(finite) if finite else 1.0
    pos = {e: e for e in finite}
    if any(math.isinf(e) for e in epsilons):
        pos[math.inf] = top * 3.0
    ticks = sorted(pos.values())
    labels = ["∞\n(no DP)" if math.isclose(t, pos.get(math.inf, -1.0)) and math.inf in pos else f"{t:g}" for t in ticks]
    return pos, ticks, labels


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return atomic_write_bytes(path, buffer.getvalue())


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy_vs_epsilon(path: str | Path, rows: Sequence[dict[str, Any]], *, title: str) -> Path:
    """The task metric against the epsilon target, one line per setting (mean over seeds, min–max bars)."""
    plt = _pyplot()
    groups = _groups(rows)
    pos, ticks, labels = _x_positions([e for _, e in groups])
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    metric = "accuracy"
    for label in dict.fromkeys(lbl for lbl, _ in groups):
        points = sorted((pos[e], [_num(r["value"]) for r in g]) for (lbl, e), g in groups.items() if lbl == label)
        metric = groups[next(k for k in groups if k[0] == label)][0]["metric"]
        xs = [x for x, _ in points]
        means = [statistics.fmean(v) for _, v in points]
        lower = [m - min(v) for m, (_, v) in zip(means, points, strict=True)]
        upper = [max(v) - m for m, (_, v) in zip(means, points, strict=True)]
        ax.errorbar(xs, means, yerr=[lower, upper], marker="o", capsize=3, label=label)
    initial = [_num(r["initial_value"]) for r in _ok(rows)]
    if initial:
        ax.axhline(statistics.fmean(initial), color="grey", linestyle=":", linewidth=1, label="before fine-tuning")
    if ticks:
        ax.set_xscale("log")
        ax.set_xticks(ticks)
        ax.set_xticklabels(labels)
        ax.minorticks_off()
    ax.set_xlabel("record-level epsilon target (delta fixed; certified by PLD)")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, Path(path))


def plot_epsilon_spread(path: str | Path, rows: Sequence[dict[str, Any]], *, title: str) -> Path:
    """Each client's certified epsilon in every private federated cell, against the cell's target."""
    plt = _pyplot()
    cells = [r for r in _ok(rows) if r["setting"] == "federated" and math.isfinite(_num(r["epsilon_target"]))]
    fig, ax = plt.subplots(figsize=(max(6.4, 0.9 * len(cells) + 2), 4.2), dpi=120)
    for i, row in enumerate(cells):
        eps = [_num(e) for e in row.get("client_epsilons", [])]
        jitter = [i + 0.25 * ((k % 5) - 2) / 2 for k in range(len(eps))]
        ax.scatter(jitter, eps, s=14, alpha=0.7, color="tab:blue")
        ax.hlines(_num(row["epsilon_target"]), i - 0.35, i + 0.35, color="tab:red", linewidth=1.5)
    ax.set_xticks(range(len(cells)))
    ax.set_xticklabels(
        [f"{r['partition']}\neps {_eps(r['epsilon_target'])}\nseed {r['seed']}" for r in cells], fontsize=7
    )
    ax.set_ylabel("client epsilon (certified, PLD)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3, axis="y")
    ax.set_title(title + "\n(dots: clients; red: target)", fontsize=10)
    if not cells:
        ax.text(0.5, 0.5, "no private federated cells finished yet", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    return _save(fig, Path(path))


def write_results_csv(path: Path, rows: Sequence[dict[str, Any]]) -> Path:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(CSV_COLUMNS), extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow(jsonable(row))
    return atomic_write_text(path, buffer.getvalue())


def write_grid_outputs(out: Path, spec: GridSpec, rows: Sequence[dict[str, Any]]) -> None:
    """Rewrite every grid output from ``rows`` (called after each cell)."""
    base = spec.base
    title = (
        f"fedtune compare {base.task}: {base.clients} clients, {base.rounds} rounds, "
        f"delta {base.delta:g}, model {Path(base.model).name if base.model else 'all-MiniLM-L6-v2'}"
    )
    atomic_write_json(out / "results.json", {"grid": spec.to_dict(), "rows": list(rows)})
    write_results_csv(out / "results.csv", rows)
    atomic_write_text(out / "results.md", f"# {title}\n\n{format_results_table(rows)}")
    plot_accuracy_vs_epsilon(out / "accuracy_vs_epsilon.png", rows, title=title)
    plot_epsilon_spread(out / "epsilon_spread.png", rows, title=f"per-client epsilon, {base.task}")
