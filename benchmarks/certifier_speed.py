"""The certifier before and after issue 12 (item 4): speed, tightness and calibration on the issue-2 grid.

What is measured
----------------
1. **Per grid cell** ``(q, sigma, steps, delta)`` of the issue-2 benchmark (``benchmarks/accountants.py``,
   250 cells), for the new certifier ``pld-fast`` (:mod:`fedtune.privacy.accountants.fast_pld`) and the
   old one (``AdaptivePLDAccountant``: dp_accounting on an epsilon-adaptive grid):

   * CPU ms per ``get_epsilon`` query (``time.process_time``) and wall ms (``time.perf_counter``);
     ``pld-fast`` *cold* (every cache emptied, including the per-``(q, sigma)`` cumulants) and *warm*
     (median of ``--repeats`` repeats of the same query at another delta: the composition is cached);
     the old certifier has no cache, it is timed once;
   * the gap to the **fine-grid PLD** (the registered ``pld``: dp_accounting, loss grid 1e-4), read from
     the issue-2 results (``benchmarks/results/accountants.json``) when its dp-accounting version matches,
     else recomputed, and the gap to a **near-exact** value: the same connect-the-dots PLD on a grid 8x
     finer than ``pld-fast``'s (slack about 1/64 of ``pld-fast``'s; it agrees with dp_accounting on any
     common grid to 1e-9, tests/privacy/test_fast_pld.py). Where the 1e-4 grid is coarse for the cell
     (tiny per-step losses: q = 0.001, sigma = 2) ``pld-fast`` is *tighter* than ``pld`` and its gap to it
     is negative; against the near-exact value it is never negative;
   * ``saddlepoint`` as shipped (it answers with the certifier outside its domain) and whether it fell back.

2. **Calibration** for the issue-2 settings and the issue-12 cell (epsilon 1, q 0.02, 2,000 steps): the old
   pipeline (saddle point, then sigma raised until the old certifier accepts it, rtol 1e-3), the new
   ``calibrate_noise`` (Brent's method on ``pld-fast`` from the saddle-point sigma), and the smallest sigma
   that meets the target under the near-exact PLD (bisection to 1e-6).

Outputs: ``<out-dir>/<name>.json`` and ``<name>.md`` (also printed). Timings are CPU time per query on
whatever else the machine is doing; rerun on an idle machine with the command below.

Examples
--------
::

    OMP_NUM_THREADS=1 python benchmarks/certifier_speed.py
    OMP_NUM_THREADS=1 python benchmarks/certifier_speed.py --quick
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import importlib.metadata
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parent))

from accountants import CALIBRATION_SETTINGS, FULL_GRID, QUICK_GRID  # noqa: E402

from fedtune.privacy.accountants import PLDAccountant, get_accountant  # noqa: E402
from fedtune.privacy.accountants import fast_pld as fp  # noqa: E402
from fedtune.privacy.accountants.reference import AdaptivePLDAccountant  # noqa: E402
from fedtune.privacy.calibration import calibrate_noise, smallest_sigma  # noqa: E402
from fedtune.privacy.events import SubsampledGaussianEvent  # noqa: E402
from fedtune.privacy.plrv import plrv_for  # noqa: E402

ISSUE_12_CELL: dict[str, Any] = {
    "setting": "issue-12 cell",
    "description": "epsilon 1, q 0.02, 2,000 steps",
    "q": 0.02,
    "steps": 2000,
}
TARGET_MS = 100.0
TARGET_GAP = 0.005
T = TypeVar("T")


def _version(pkg: str) -> str:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def _timed(fn: Callable[[], T]) -> tuple[T, float, float]:
    """``(value, cpu_seconds, wall_seconds)`` of one call."""
    cpu, wall = time.process_time(), time.perf_counter()
    value = fn()
    return value, time.process_time() - cpu, time.perf_counter() - wall


def cold_caches() -> None:
    """Empty every cache pld-fast uses (per-step PLDs, compositions, cumulants)."""
    fp.clear_caches()
    plrv_for.cache_clear()


def near_exact(event: SubsampledGaussianEvent, delta: float) -> float:
    """Connect-the-dots PLD on a grid 8x finer than pld-fast's (slack ~1/64 of pld-fast's)."""
    return fp.FastPLDAccountant(grid_factor=fp.GRID_FACTOR / 8).get_epsilon(event, delta)


def cached_pld_reference(path: Path) -> dict[tuple[float, float, int, float], float]:
    """The issue-2 ``pld`` (1e-4 grid) epsilons, if they were computed with this dp-accounting version."""
    if not path.exists():
        return {}
    data = json.loads(path.read_text())
    if f"dp-accounting {_version('dp-accounting')}" not in str(data.get("meta", {}).get("versions", "")):
        return {}
    out = {}
    for row in data.get("rows", []):
        pld = row.get("accountants", {}).get("pld", {})
        if pld.get("status") == "ok" and pld.get("epsilon") is not None:
            out[(row["q"], row["sigma"], row["steps"], row["delta"])] = float(pld["epsilon"])
    return out


def run_cell(q: float, sigma: float, steps: int, delta: float, args: argparse.Namespace, pld_ref: float | None) -> dict:
    """All measurements of one grid cell."""
    event = SubsampledGaussianEvent(q, sigma, steps)
    new = get_accountant("pld-fast")
    cold_caches()
    eps_new, cpu_cold, wall_cold = _timed(lambda: new.get_epsilon(event, delta))
    warm = [
        _timed(functools.partial(new.get_epsilon, event, delta * (1.0 + 1e-3 * (i + 1)))) for i in range(args.repeats)
    ]
    row: dict[str, Any] = {
        "q": q,
        "sigma": sigma,
        "steps": steps,
        "delta": delta,
        "q_steps": q * steps,
        "grid_step": fp.grid_step((((q, sigma), steps),)),
        "eps_new": eps_new,
        "new_cpu_ms_cold": 1e3 * cpu_cold,
        "new_wall_ms_cold": 1e3 * wall_cold,
        "new_cpu_ms_warm": 1e3 * statistics.median(w[1] for w in warm),
        "new_wall_ms_warm": 1e3 * statistics.median(w[2] for w in warm),
    }
    row["eps_near_exact"] = near_exact(event, delta)
    if pld_ref is None:
        pld_ref = PLDAccountant(1e-4).get_epsilon(event, delta)
        row["pld_source"] = "computed"
    else:
        row["pld_source"] = "issue-2 results"
    row["eps_pld"] = pld_ref
    if args.old:
        eps_old, cpu_old, wall_old = _timed(lambda: AdaptivePLDAccountant().get_epsilon(event, delta))
        row |= {"eps_old": eps_old, "old_cpu_ms": 1e3 * cpu_old, "old_wall_ms": 1e3 * wall_old}
    sp = get_accountant("saddlepoint")
    cold_caches()
    _, cpu_sp, _ = _timed(lambda: sp.get_epsilon(event, delta))
    row |= {"saddlepoint_cpu_ms_cold": 1e3 * cpu_sp, "saddlepoint_fallback": getattr(sp, "fallbacks", 0) > 0}
    for name in ("new", "old"):
        if f"eps_{name}" in row:
            row[f"gap_{name}_near_exact"] = row[f"eps_{name}"] / row["eps_near_exact"] - 1.0
            row[f"gap_{name}_pld"] = row[f"eps_{name}"] / row["eps_pld"] - 1.0
    return row


def old_calibration(target: float, delta: float, q: float, steps: int) -> float:
    """The pre-issue-12 pipeline: saddle-point sigma, raised until the old certifier accepts it."""
    sigma_est = smallest_sigma(get_accountant("saddlepoint"), target, delta, q, steps)
    cert = AdaptivePLDAccountant()
    if cert.get_epsilon(SubsampledGaussianEvent(q, sigma_est, steps), delta) <= target:
        return sigma_est
    return smallest_sigma(cert, target, delta, q, steps, start=sigma_est, rtol=1e-3)


def run_calibration(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Old vs new certified sigma vs the smallest sigma meeting the target (near-exact PLD)."""
    rows = []
    delta = args.calib_delta
    settings = [ISSUE_12_CELL] if args.quick else [*CALIBRATION_SETTINGS, ISSUE_12_CELL]
    for setting in settings:
        q, steps = setting["q"], setting["steps"]
        for target in [1.0] if setting is ISSUE_12_CELL else args.calib_eps:
            exact = fp.FastPLDAccountant(grid_factor=fp.GRID_FACTOR / 8)
            cold_caches()
            cal, cpu_new, wall_new = _timed(functools.partial(calibrate_noise, target, delta, q, steps))
            smallest = smallest_sigma(exact, target, delta, q, steps, start=cal.sigma, rtol=1e-6, growth=1.01)
            row: dict[str, Any] = {
                "setting": setting["setting"],
                "q": q,
                "steps": steps,
                "target_epsilon": target,
                "delta": delta,
                "sigma_estimate": cal.sigma_estimate,
                "sigma_new": cal.sigma,
                "certified_epsilon_new": cal.certified_epsilon,
                "new_cpu_s": cpu_new,
                "new_wall_s": wall_new,
                "sigma_smallest": smallest,
                "gap_new": cal.sigma / smallest - 1.0,
            }
            if args.old:
                sigma_old, cpu_old, wall_old = _timed(functools.partial(old_calibration, target, delta, q, steps))
                row |= {
                    "sigma_old": sigma_old,
                    "old_cpu_s": cpu_old,
                    "old_wall_s": wall_old,
                    "gap_old": sigma_old / smallest - 1.0,
                }
            rows.append(row)
            print(f"[calibration] {setting['setting']} eps={target:g}: {row}", file=sys.stderr, flush=True)
    return rows


def _pct(x: float | None, digits: int = 3) -> str:
    return "—" if x is None or not math.isfinite(x) else f"{100 * x:+.{digits}f}%"


def _ms(x: float | None) -> str:
    return "—" if x is None else (f"{x:.1f}" if x < 100 else f"{x:.0f}")


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians and extremes over the grid."""

    def col(key: str) -> list[float]:
        return [r[key] for r in rows if key in r]

    out: dict[str, Any] = {"cells": len(rows)}
    for key in ("new_cpu_ms_cold", "new_cpu_ms_warm", "new_wall_ms_cold", "old_cpu_ms", "old_wall_ms"):
        values = col(key)
        if values:
            out[key] = {"median": statistics.median(values), "max": max(values)}
    for key in ("gap_new_near_exact", "gap_new_pld", "gap_old_near_exact", "gap_old_pld"):
        values = col(key)
        if values:
            out[key] = {"min": min(values), "median": statistics.median(values), "max": max(values)}
    out["new_cells_over_100ms_cpu_cold"] = sum(v > TARGET_MS for v in col("new_cpu_ms_cold"))
    out["new_cells_over_half_percent"] = sum(v > TARGET_GAP for v in col("gap_new_near_exact"))
    out["new_cells_below_near_exact"] = sum(v < 0 for v in col("gap_new_near_exact"))
    sp = [r for r in rows if r.get("saddlepoint_fallback")]
    out["saddlepoint_fallback_cells"] = len(sp)
    if sp:
        out["saddlepoint_fallback_cpu_ms"] = {
            "median": statistics.median(r["saddlepoint_cpu_ms_cold"] for r in sp),
            "max": max(r["saddlepoint_cpu_ms_cold"] for r in sp),
        }
    return out


def markdown(meta: dict[str, Any], summary: dict[str, Any], rows: list[dict[str, Any]], calib: list[dict]) -> str:
    """The report."""
    lines = [
        "# Certifier speed and tightness (issue 12, item 4)",
        "",
        f"- Command: `{meta['command']}`; {meta['date']}; {meta['versions']}.",
        f"- {summary['cells']} cells. CPU ms per `get_epsilon` query (`time.process_time`; wall in the JSON).",
        "- gap = ε / ε_ref − 1. near-exact: connect-the-dots PLD on a grid 8x finer than pld-fast's. "
        "pld: dp_accounting, loss grid 1e-4.",
        "",
        "## Summary",
        "",
        "| certifier | CPU ms cold (median / max) | CPU ms warm (median / max) "
        "| gap to near-exact (min / median / max) | gap to pld 1e-4 (min / median / max) |",
        "|---|--:|--:|--:|--:|",
    ]
    s = summary

    def trio(key: str) -> str:
        if key not in s:
            return "—"
        return f"{_pct(s[key]['min'])} / {_pct(s[key]['median'])} / {_pct(s[key]['max'])}"

    def duo(key: str) -> str:
        return f"{_ms(s[key]['median'])} / {_ms(s[key]['max'])}" if key in s else "—"

    lines.append(
        f"| `pld-fast` (new) | {duo('new_cpu_ms_cold')} | {duo('new_cpu_ms_warm')} | {trio('gap_new_near_exact')} "
        f"| {trio('gap_new_pld')} |"
    )
    if "old_cpu_ms" in s:
        lines.append(
            f"| adaptive dp_accounting PLD (old) | {duo('old_cpu_ms')} | (no cache) | {trio('gap_old_near_exact')} "
            f"| {trio('gap_old_pld')} |"
        )
    lines += [
        "",
        f"- pld-fast cells over {TARGET_MS:g} ms (cold CPU): {s['new_cells_over_100ms_cpu_cold']}; over 0.5% above "
        f"near-exact: {s['new_cells_over_half_percent']}; below near-exact: {s['new_cells_below_near_exact']}.",
        f"- saddlepoint as shipped fell back to the certifier on {s['saddlepoint_fallback_cells']} cells"
        + (
            f" (cold CPU ms median {_ms(s['saddlepoint_fallback_cpu_ms']['median'])}, "
            f"max {_ms(s['saddlepoint_fallback_cpu_ms']['max'])})."
            if "saddlepoint_fallback_cpu_ms" in s
            else "."
        ),
        "",
    ]
    if calib:
        lines += [
            "## Calibration: certified σ, old vs new, against the smallest σ meeting the target",
            "",
            "| setting | q | steps | ε | saddlepoint σ | old σ (gap) | new σ (gap) | smallest σ "
            "| old CPU s | new CPU s |",
            "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
        ]
        for c in calib:
            old = f"{c['sigma_old']:.5f} ({_pct(c['gap_old'], 2)})" if "sigma_old" in c else "—"
            lines.append(
                f"| {c['setting']} | {c['q']:.4g} | {c['steps']} | {c['target_epsilon']:g} | {c['sigma_estimate']:.5f} "
                f"| {old} | {c['sigma_new']:.5f} ({_pct(c['gap_new'], 2)}) | {c['sigma_smallest']:.5f} "
                f"| {c.get('old_cpu_s', float('nan')):.2f} | {c['new_cpu_s']:.2f} |"
            )
        lines.append("")
    lines += [
        "## Grid",
        "",
        "| q | σ | steps | δ | q·T | ε pld-fast | gap near-exact | gap pld 1e-4 | new ms cold | new ms warm "
        "| old ms | old gap near-exact | saddlepoint ms (fallback) |",
        "|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--|",
    ]
    for r in rows:
        lines.append(
            f"| {r['q']:g} | {r['sigma']:g} | {r['steps']} | {r['delta']:g} | {r['q_steps']:g} | {r['eps_new']:.5g} "
            f"| {_pct(r['gap_new_near_exact'])} | {_pct(r['gap_new_pld'])} | {_ms(r['new_cpu_ms_cold'])} "
            f"| {_ms(r['new_cpu_ms_warm'])} | {_ms(r.get('old_cpu_ms'))} | {_pct(r.get('gap_old_near_exact'))} "
            f"| {_ms(r['saddlepoint_cpu_ms_cold'])}{' (fb)' if r['saddlepoint_fallback'] else ''} |"
        )
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the 8-cell quick grid and the issue-12 calibration cell")
    p.add_argument("--repeats", type=int, default=3, help="warm repeats per cell (median reported)")
    p.add_argument("--no-old", dest="old", action="store_false", help="skip the old certifier (0.1-6 s a query)")
    p.add_argument("--calib-eps", type=float, nargs="+", default=[1.0, 3.0, 8.0], help="calibration targets")
    p.add_argument("--calib-delta", type=float, default=1e-5)
    p.add_argument("--no-calibration", dest="calibration", action="store_false")
    p.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("--name", help="output stem (default certifier_speed, or certifier_speed_quick)")
    args = p.parse_args(argv)
    args.name = args.name or ("certifier_speed_quick" if args.quick else "certifier_speed")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run and write the outputs."""
    args = parse_args(argv)
    grid = QUICK_GRID if args.quick else FULL_GRID
    started = time.perf_counter()
    refs = cached_pld_reference(args.out_dir / "accountants.json")
    rows = []
    cells = [(q, s, t, d) for q in grid["q"] for s in grid["sigma"] for t in grid["steps"] for d in grid["delta"]]
    for i, (q, s, t, d) in enumerate(cells):
        row = run_cell(q, s, int(t), d, args, refs.get((q, s, int(t), d)))
        rows.append(row)
        print(
            f"[{i + 1}/{len(cells)}] q={q:g} sigma={s:g} T={t} delta={d:g}: eps {row['eps_new']:.6g} "
            f"gap {_pct(row['gap_new_near_exact'])} cold {row['new_cpu_ms_cold']:.1f} ms "
            f"old {row.get('old_cpu_ms', float('nan')):.0f} ms",
            file=sys.stderr,
            flush=True,
        )
    calib = run_calibration(args) if args.calibration else []
    meta = {
        "command": "OMP_NUM_THREADS=1 python benchmarks/certifier_speed.py" + (" --quick" if args.quick else ""),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "versions": ", ".join(
            [f"python {platform.python_version()}"]
            + [f"{p} {_version(p)}" for p in ("numpy", "scipy", "dp-accounting")]
        ),
        "grid_factor": fp.GRID_FACTOR,
        "minutes": (time.perf_counter() - started) / 60,
        "timing": "CPU time per query (time.process_time); wall time also recorded",
    }
    summary = summarize(rows)
    report = markdown(meta, summary, rows, calib)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"{args.name}.json").write_text(
        json.dumps({"meta": meta, "summary": summary, "calibration": calib, "rows": rows}, indent=1)
    )
    (args.out_dir / f"{args.name}.md").write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
