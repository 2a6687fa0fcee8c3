"""Benchmark fedtune's privacy accountants against the certified PLD reference.

What is measured
----------------
1. **Accuracy grid.** For every cell ``(q, sigma, steps, delta)`` of the Poisson-subsampled Gaussian
   mechanism, each accountant's ``epsilon(delta)`` (add/remove-one neighbours) and its relative gap
   to the reference, ``gap = (eps - eps_pld) / eps_pld``. The reference is ``pld``: dp_accounting's
   privacy loss distribution accountant with pessimistic discretisation, a certified upper bound
   that is tight up to its discretisation (``--pld-discretization``, default 1e-4). A negative gap
   means the accountant *understates* the certified epsilon: for the estimates (``edgeworth1``,
   ``edgeworth``, ``saddlepoint``, ``prv``) that is the dangerous direction; ``rdp`` is a looser
   certified bound and should only overstate.
2. **Cost.** Seconds per ``get_epsilon`` query. The analytic accountants (Edgeworth family) are timed
   in-process: a *cold* query right after clearing the per-``(q, sigma)`` cumulant cache (what a
   calibration sweep pays, since every sigma is new) and the median of ``--repeats`` *warm* queries.
   The reference accountants (``pld``, ``rdp``, ``prv``) are timed once each, in a forked worker
   with a time limit (``--timeout``); their results are cached in a JSON file next to the outputs
   keyed by accountant setting (including a hash of the accountant's source and the library version)
   and cell, so a rerun is cheap (cached timings are the original ones).
   ``saddlepoint`` is measured as shipped: outside the expansion's domain it answers with the
   certified ``pld`` value (a *fallback*, recorded per cell). ``saddlepoint-raw`` is a diagnostic:
   the same accountant with its domain checks disabled (thresholds set to never trigger), i.e. the
   bare expansion, showing what the fallback guards against.
3. **Summary** per accountant (max / median ``|gap|``, fraction of cells within 1% of ``pld``, the
   cells understating ``pld`` by more than 1%, ms per query) and, for the Edgeworth family, where the
   1% target is missed, broken down by the expected number of inclusions ``q * steps`` (the known
   weak spot of the saddle-point expansion is few expected inclusions) and by ``sigma``.
4. **Calibration.** The noise multiplier each accountant alone asks for at a target epsilon, the
   certified (``pld``) epsilon at that sigma, and fedtune's default pipeline (``calibrate_noise``:
   saddle point, then raise sigma until the ``pld`` certifier meets the target), for a centralised
   SST-2 setting and a federated client setting. "Noise saved against rdp" is
   ``1 - sigma_acc / sigma_rdp``.

Failures (``AccountingError``, ``OverflowError``, non-finite epsilon, a worker timeout or crash) are
recorded with their error text and never stop the benchmark; a cell counts as a miss for an
accountant that failed on it.

Outputs (``--out-dir``, default ``benchmarks/results``; file stem ``--name``, default ``accountants``
or ``accountants_quick`` with ``--quick``): ``<name>.json`` (all rows, summary, calibration),
``<name>.csv`` (the grid), ``<name>.md`` (report, also printed to stdout), ``<name>_gap.png``
(gap vs ``q * steps``) and the cache ``<name>_cache.json``.

Examples
--------
::

    python benchmarks/accountants.py --quick
    nohup python benchmarks/accountants.py > /tmp/acc.out 2> /tmp/acc.err &
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as dt
import hashlib
import importlib.metadata
import inspect
import json
import logging
import math
import multiprocessing as mp
import os
import platform
import shlex
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import fedtune.privacy
from fedtune.privacy.accountants import (
    Accountant,
    PLDAccountant,
    PRVAccountant,
    RDPAccountant,
    get_accountant,
    to_dp_event,
)
from fedtune.privacy.accountants import (
    saddlepoint as saddlepoint_module,
)
from fedtune.privacy.calibration import calibrate_noise, certifier, smallest_sigma
from fedtune.privacy.events import SubsampledGaussianEvent
from fedtune.privacy.plrv import plrv_for

#: ``saddlepoint-raw`` is a diagnostic, not a registered accountant: the saddle-point accountant with
#: its domain checks disabled (see :func:`expansion_only`), i.e. the bare expansion.
RAW = "saddlepoint-raw"
_THRESHOLDS = {"MIN_TILTED_INCLUSIONS": 0.0, "MAX_RELATIVE_CORRECTION": math.inf}
HAS_FALLBACK = all(hasattr(saddlepoint_module, k) for k in _THRESHOLDS)
ANALYTIC: tuple[str, ...] = ("edgeworth1", "edgeworth", "saddlepoint") + ((RAW,) if HAS_FALLBACK else ())
REFERENCE: tuple[str, ...] = ("pld", "rdp", "prv")
ALL_ACCOUNTANTS: tuple[str, ...] = ANALYTIC + REFERENCE
DEFAULT_PLD_DISCRETIZATION = 1e-4  # dp_accounting's (and fedtune's registry ``pld``) default

FULL_GRID: dict[str, list[float]] = {
    "q": [0.001, 0.003, 0.01, 0.03, 0.1],
    "sigma": [0.5, 0.75, 1.0, 1.5, 2.0],
    "steps": [100, 300, 1000, 3000, 10000],
    "delta": [1e-5, 1e-6],
}
QUICK_GRID: dict[str, list[float]] = {
    "q": [0.001, 0.1],
    "sigma": [0.75, 2.0],
    "steps": [100, 1000],
    "delta": [1e-5],
}
#: buckets of the expected number of inclusions q * steps (lower edges)
QT_BINS: tuple[tuple[float, float, str], ...] = (
    (0.0, 1.0, "q*T < 1"),
    (1.0, 10.0, "1 <= q*T < 10"),
    (10.0, 100.0, "10 <= q*T < 100"),
    (100.0, math.inf, "q*T >= 100"),
)
TOLERANCE = 0.01  # the 1% accuracy target

SST2_TRAIN = 67_349
CLIENTS = 8
BATCH = 64
ROUNDS = 5
PER_CLIENT = SST2_TRAIN // CLIENTS  # 8418
STEPS_PER_ROUND = PER_CLIENT // BATCH  # 131 (one local epoch)
CALIBRATION_SETTINGS: tuple[dict[str, Any], ...] = (
    {
        "setting": "centralized SST-2",
        "description": "centralised DP-SGD on SST-2: q = 0.03, 660 steps",
        "q": 0.03,
        "steps": 660,
    },
    {
        "setting": "federated client",
        "description": (
            f"one of {CLIENTS} clients with {PER_CLIENT:,} SST-2 examples each ({SST2_TRAIN:,} / {CLIENTS}), "
            f"batch {BATCH}: q = {BATCH}/{PER_CLIENT} = {BATCH / PER_CLIENT:.5f}; {ROUNDS} rounds x 1 local epoch "
            f"({STEPS_PER_ROUND} steps) = {ROUNDS * STEPS_PER_ROUND} steps; record-level DP of that client's data"
        ),
        "q": BATCH / PER_CLIENT,
        "steps": ROUNDS * STEPS_PER_ROUND,
    },
)

log = logging.getLogger("benchmarks.accountants")


# --------------------------------------------------------------------------------------------------
# running one query: in-process (analytic) or in a forked worker with a time limit (reference)
# --------------------------------------------------------------------------------------------------


class _Collect(logging.Handler):
    """Collects the messages (INFO and above) logged by the privacy module during one query."""

    def __init__(self) -> None:
        super().__init__(level=logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def kind_of(name: str) -> str:
    """``estimate`` or ``upper-bound`` (the raw expansion is an estimate)."""
    return "estimate" if name == RAW else get_accountant(name).kind


@contextlib.contextmanager
def expansion_only() -> Iterable[None]:
    """Disable the saddle-point accountant's domain checks (thresholds set to never trigger).

    Inside, ``saddlepoint`` still falls back to ``pld`` when the expansion itself breaks down
    (non-positive delta); the caller detects that through the accountant's ``fallbacks`` counter.
    """
    saved = {k: getattr(saddlepoint_module, k) for k in _THRESHOLDS}
    try:
        for k, v in _THRESHOLDS.items():
            setattr(saddlepoint_module, k, v)
        yield
    finally:
        for k, v in saved.items():
            setattr(saddlepoint_module, k, v)


def _version(pkg: str) -> str:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def _digest(*parts: str) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:10]


def privacy_fingerprint() -> str:
    """Hash of every source file of ``fedtune.privacy`` (keys the calibration cache)."""
    root = Path(fedtune.privacy.__file__).resolve().parent
    files = sorted(root.rglob("*.py"))
    return _digest(*(f"{f.relative_to(root)}\n{f.read_text()}" for f in files))


def make_accountant(name: str, pld_discretization: float) -> Accountant:
    """The registry accountant ``name``; ``pld`` with the requested discretisation."""
    if name == "pld" and pld_discretization != DEFAULT_PLD_DISCRETIZATION:
        acc = PLDAccountant(value_discretization_interval=pld_discretization)
        acc.name = "pld"  # type: ignore[misc]
        return acc
    return get_accountant(name)


def setting_tag(name: str, pld_discretization: float) -> str:
    """Cache-key prefix: the accountant, its setting, a hash of its source and its library version.

    A change to the accountant's class (or library) starts a fresh cache entry; changes elsewhere in
    the privacy module do not invalidate the (expensive) reference results.
    """
    if name == "pld":
        src = _digest(inspect.getsource(PLDAccountant), inspect.getsource(to_dp_event))
        return f"pld[vdi={pld_discretization!r},src={src},dp-accounting={_version('dp-accounting')}]"
    if name == "rdp":
        src = _digest(inspect.getsource(RDPAccountant), repr(RDPAccountant().orders.tolist()))
        return f"rdp[src={src},opacus={_version('opacus')}]"
    if name == "prv":
        return f"prv[src={_digest(inspect.getsource(PRVAccountant))},opacus={_version('opacus')}]"
    raise ValueError(f"no cache tag for {name!r}")


def _child(conn: Any, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            value = fn(*args)
        conn.send(("ok", value, time.perf_counter() - start))
    except BaseException as err:  # noqa: BLE001 - report anything, the parent decides
        conn.send(("error", f"{type(err).__name__}: {err}", time.perf_counter() - start))
    finally:
        conn.close()


def run_isolated(fn: Callable[..., Any], args: tuple[Any, ...], timeout: float) -> tuple[str, Any, float]:
    """Run ``fn(*args)`` in a forked worker; return ``(status, value or error text, seconds)``.

    ``status`` is ``ok``, ``error`` (exception text), ``timeout`` or ``crashed`` (e.g. killed for
    memory). ``seconds`` is measured inside the worker (fork overhead excluded).
    """
    ctx = mp.get_context("fork")
    receiver, sender = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(sender, fn, args), daemon=True)
    proc.start()
    sender.close()
    try:
        if receiver.poll(timeout):
            try:
                status, value, seconds = receiver.recv()
            except EOFError:
                proc.join(5)
                return "crashed", f"worker died without an answer (exit code {proc.exitcode})", math.nan
            return status, value, seconds
        return "timeout", f"timeout: no answer within {timeout:g} s (worker killed)", timeout
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join()
        receiver.close()


def warm_up(args: argparse.Namespace) -> None:
    """One tiny query per reference accountant in the parent, so that the libraries they import
    lazily (opacus pulls in torch: seconds) are loaded before forking and not timed per query."""
    for name in args.accountants:
        if name in REFERENCE:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                _reference_epsilon(name, args.pld_discretization, 0.01, 1.0, 1, 1e-5)


def _reference_epsilon(name: str, pld_discretization: float, q: float, sigma: float, steps: int, delta: float) -> float:
    return make_accountant(name, pld_discretization).get_epsilon(SubsampledGaussianEvent(q, sigma, steps), delta)


def _finish(status: str, value: Any, seconds: float) -> dict[str, Any]:
    """Normalise a query outcome: non-finite epsilons become failures."""
    if status == "ok":
        eps = float(value)
        if math.isfinite(eps):
            return {"status": "ok", "epsilon": eps, "error": None, "seconds": seconds}
        return {"status": "non-finite", "epsilon": None, "error": f"returned epsilon = {eps}", "seconds": seconds}
    return {"status": status, "epsilon": None, "error": str(value), "seconds": seconds}


def query_reference(name: str, cell: dict[str, Any], args: argparse.Namespace, cache: dict[str, Any]) -> dict[str, Any]:
    """One reference-accountant query, served from the cache when possible."""
    key = cell_key(setting_tag(name, args.pld_discretization), cell)
    hit = cache.get(key)
    # a cached timeout is reused only when the current limit is not longer than the one that expired
    if hit is not None and (hit["status"] != "timeout" or args.timeout <= hit.get("limit", 0.0)):
        return {**hit, "cached": True}
    status, value, seconds = run_isolated(
        _reference_epsilon,
        (name, args.pld_discretization, cell["q"], cell["sigma"], cell["steps"], cell["delta"]),
        args.timeout,
    )
    result = _finish(status, value, seconds)
    if result["status"] == "timeout":
        result["limit"] = args.timeout
    if result["status"] != "crashed":  # crashes (e.g. out of memory) are retried on the next run
        cache[key] = result
    return {**result, "cached": False}


def _timed_query(acc: Accountant, event: SubsampledGaussianEvent, delta: float) -> tuple[float, float, int]:
    """``(epsilon, seconds, fallbacks)`` of one query; ``fallbacks`` counts answers delegated to pld."""
    before = getattr(acc, "fallbacks", 0)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        eps = acc.get_epsilon(event, delta)
    return eps, time.perf_counter() - start, getattr(acc, "fallbacks", 0) - before


def query_analytic(name: str, cell: dict[str, Any], repeats: int, budget: float) -> dict[str, Any]:
    """One analytic-accountant query: a cold query (cumulant cache cleared), then the median of up
    to ``repeats`` warm queries (fewer once ``budget`` seconds are spent). Records whether the
    answer came from the saddle point's pld fallback, and the messages the module logged."""
    acc = get_accountant("saddlepoint" if name == RAW else name)
    event = SubsampledGaussianEvent(cell["q"], cell["sigma"], cell["steps"])
    handler = _Collect()
    privacy_log = logging.getLogger("fedtune.privacy")
    privacy_log.addHandler(handler)
    mode = expansion_only() if name == RAW else contextlib.nullcontext()
    try:
        with mode:
            plrv_for.cache_clear()
            try:
                eps, cold, fallbacks = _timed_query(acc, event, cell["delta"])
            except Exception as err:  # noqa: BLE001 - AccountingError, OverflowError, ...: a recorded failure
                out = _finish("error", f"{type(err).__name__}: {err}", math.nan)
                return out | {"cold_seconds": None, "fallback": False, "notes": sorted(set(handler.messages))}
            warm: list[float] = []
            while len(warm) < repeats and sum(warm) + cold < budget or not warm:
                warm.append(_timed_query(acc, event, cell["delta"])[1])
    finally:
        privacy_log.removeHandler(handler)
    notes = sorted(set(handler.messages))
    if name == RAW and fallbacks:  # the bare expansion broke down: the number is pld's, not its own
        return _finish("error", "expansion breakdown: " + "; ".join(notes), cold) | {
            "cold_seconds": cold,
            "fallback": True,
            "notes": notes,
        }
    out = _finish("ok", eps, statistics.median(warm))
    return out | {"cold_seconds": cold, "fallback": bool(fallbacks), "notes": notes, "warm_repeats": len(warm)}


# --------------------------------------------------------------------------------------------------
# cache
# --------------------------------------------------------------------------------------------------


def cell_key(tag: str, cell: dict[str, Any]) -> str:
    """Cache key of one accountant setting at one cell."""
    return f"{tag}|q={cell['q']!r}|sigma={cell['sigma']!r}|steps={cell['steps']}|delta={cell['delta']!r}"


def load_cache(path: Path, enabled: bool) -> dict[str, Any]:
    """The cache dictionary (empty if disabled, missing or unreadable)."""
    if not enabled or not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        log.warning("ignoring unreadable cache %s: %s", path, err)
        return {}


def save_cache(path: Path, cache: dict[str, Any], enabled: bool) -> None:
    """Write the cache atomically."""
    if not enabled:
        return
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(cache, indent=0, sort_keys=True))
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------------
# grid
# --------------------------------------------------------------------------------------------------


def grid_cells(grid: dict[str, list[float]]) -> list[dict[str, Any]]:
    """All cells of the grid (delta outermost, steps innermost)."""
    return [
        {"q": float(q), "sigma": float(s), "steps": int(t), "delta": float(d), "q_steps": float(q) * int(t)}
        for d in grid["delta"]
        for q in grid["q"]
        for s in grid["sigma"]
        for t in grid["steps"]
    ]


def run_grid(args: argparse.Namespace, cache: dict[str, Any], cache_path: Path) -> list[dict[str, Any]]:
    """Evaluate every accountant on every cell; progress on stderr, cache saved after each cell."""
    cells = grid_cells(args.grid)
    rows: list[dict[str, Any]] = []
    start = time.perf_counter()
    for i, cell in enumerate(cells, 1):
        results: dict[str, dict[str, Any]] = {}
        for name in args.accountants:
            if name in REFERENCE:
                results[name] = query_reference(name, cell, args, cache)
            else:
                results[name] = query_analytic(name, cell, args.repeats, args.time_budget)
        ref = results.get("pld", {}).get("epsilon")
        for res in results.values():
            eps = res["epsilon"]
            res["gap"] = (eps - ref) / ref if (eps is not None and ref is not None and ref > 0) else None
        rows.append({**cell, "accountants": results})
        save_cache(cache_path, cache, args.cache)
        pld = results.get("pld", {})
        if pld.get("epsilon") is not None:
            how = "cached" if pld.get("cached") else f"{pld['seconds']:.2f}s"
            pld_text = f"pld={pld['epsilon']:.5g} ({how})"
        else:
            pld_text = f"pld FAILED ({pld.get('error')})"
        fails = [n for n, r in results.items() if r["status"] != "ok"]
        print(
            f"[{i:>3}/{len(cells)}] q={cell['q']:g} sigma={cell['sigma']:g} T={cell['steps']} delta={cell['delta']:g} "
            f"{pld_text}{' failed: ' + ','.join(fails) if fails else ''}  elapsed {time.perf_counter() - start:.1f}s",
            file=sys.stderr,
            flush=True,
        )
    return rows


# --------------------------------------------------------------------------------------------------
# summaries
# --------------------------------------------------------------------------------------------------


def _ms(values: Iterable[float]) -> tuple[float | None, float | None]:
    vals = [v * 1e3 for v in values if v is not None and math.isfinite(v)]
    return (statistics.median(vals), max(vals)) if vals else (None, None)


def summarize(rows: list[dict[str, Any]], accountants: Sequence[str]) -> list[dict[str, Any]]:
    """Per-accountant accuracy and cost summary (cells without a pld reference are excluded)."""
    with_ref = [r for r in rows if r["accountants"].get("pld", {}).get("epsilon") is not None]
    out = []
    for name in accountants:
        res = [r["accountants"][name] for r in with_ref]
        gaps = [x["gap"] for x in res if x["gap"] is not None]
        fails = [r for r in rows if r["accountants"][name]["status"] != "ok"]  # also cells without a reference
        under = [r for r in with_ref if (g := r["accountants"][name]["gap"]) is not None and g < -TOLERANCE]
        over = [r for r in with_ref if (g := r["accountants"][name]["gap"]) is not None and g > TOLERANCE]
        within = sum(1 for g in gaps if abs(g) <= TOLERANCE)
        med_ms, max_ms = _ms(x["seconds"] for x in res)
        cold_med, cold_max = _ms(x.get("cold_seconds") for x in res) if name in ANALYTIC else (None, None)
        kind = kind_of(name)
        out.append(
            {
                "accountant": name,
                "kind": kind,
                "cells": len(res),
                "failures": sum(1 for x in res if x["status"] != "ok"),
                "max_abs_gap": max((abs(g) for g in gaps), default=None),
                "median_abs_gap": statistics.median([abs(g) for g in gaps]) if gaps else None,
                "within_1pct": within / len(res) if res else None,
                "over_1pct": len(over),
                "under_1pct": len(under),
                "understated_cells": [
                    {k: r[k] for k in ("q", "sigma", "steps", "delta", "q_steps")}
                    | {
                        "epsilon": r["accountants"][name]["epsilon"],
                        "pld": r["accountants"]["pld"]["epsilon"],
                        "gap": r["accountants"][name]["gap"],
                    }
                    for r in under
                ],
                "failed_cells": [
                    {k: r[k] for k in ("q", "sigma", "steps", "delta")}
                    | {"status": r["accountants"][name]["status"], "error": r["accountants"][name]["error"]}
                    for r in fails
                ],
                "median_ms": med_ms,
                "max_ms": max_ms,
                "cold_median_ms": cold_med,
                "cold_max_ms": cold_max,
                "fallbacks": sum(1 for x in res if x.get("fallback")),
                "fallback_cells": [
                    {k: r[k] for k in ("q", "sigma", "steps", "delta", "q_steps")}
                    | {"notes": r["accountants"][name].get("notes")}
                    for r in with_ref
                    if r["accountants"][name].get("fallback")
                ],
                "multiple_crossing_warnings": sum(
                    1 for x in res if any("crosses the target" in m for m in x.get("notes") or [])
                ),
            }
        )
    return out


def miss_breakdown(rows: list[dict[str, Any]], accountants: Sequence[str], by: str) -> list[dict[str, Any]]:
    """Where the Edgeworth family misses 1%: per accountant and per bucket of ``q*T`` or ``sigma``."""
    with_ref = [r for r in rows if r["accountants"].get("pld", {}).get("epsilon") is not None]
    if by == "q_steps":
        buckets = [(label, lambda r, lo=lo, hi=hi: lo <= r["q_steps"] < hi) for lo, hi, label in QT_BINS]
    else:
        values = sorted({r[by] for r in with_ref})
        buckets = [(f"{by} = {v:g}", lambda r, v=v: r[by] == v) for v in values]
    out = []
    for name in accountants:
        if name not in ANALYTIC:
            continue
        for label, member in buckets:
            cells = [r for r in with_ref if member(r)]
            if not cells:
                continue
            gaps = [r["accountants"][name]["gap"] for r in cells]
            ok = [g for g in gaps if g is not None]
            out.append(
                {
                    "accountant": name,
                    "bucket": label,
                    "cells": len(cells),
                    "within_1pct": sum(1 for g in ok if abs(g) <= TOLERANCE),
                    "over_1pct": sum(1 for g in ok if g > TOLERANCE),
                    "under_1pct": sum(1 for g in ok if g < -TOLERANCE),
                    "failed": len(gaps) - len(ok),
                    "fallbacks": sum(1 for r in cells if r["accountants"][name].get("fallback")),
                    "max_abs_gap": max((abs(g) for g in ok), default=None),
                    "min_gap": min(ok, default=None),
                }
            )
    return out


# --------------------------------------------------------------------------------------------------
# calibration
# --------------------------------------------------------------------------------------------------


def _sigma_for(name: str, pld_discretization: float, eps: float, delta: float, q: float, steps: int) -> dict[str, Any]:
    acc = make_accountant(name, pld_discretization)
    sigma = smallest_sigma(acc, eps, delta, q, steps)
    during = getattr(acc, "fallbacks", 0)
    acc.get_epsilon(SubsampledGaussianEvent(q, sigma, steps), delta)
    return {"sigma": sigma, "fallback_queries": during, "fallback_at_sigma": getattr(acc, "fallbacks", 0) > during}


def _certified_epsilon(pld_discretization: float, sigma: float, delta: float, q: float, steps: int) -> float:
    return make_accountant("pld", pld_discretization).get_epsilon(SubsampledGaussianEvent(q, sigma, steps), delta)


def _default_calibration(eps: float, delta: float, q: float, steps: int) -> dict[str, Any]:
    return calibrate_noise(eps, delta, q, steps).to_dict()


def _cached_isolated(
    key: str, cache: dict[str, Any], fn: Callable[..., Any], fargs: tuple[Any, ...], timeout: float
) -> tuple[str, Any, float, bool]:
    if key in cache:
        hit = cache[key]
        return hit["status"], hit["value"], hit["seconds"], True
    status, value, seconds = run_isolated(fn, fargs, timeout)
    if status in ("ok", "error"):
        cache[key] = {"status": status, "value": value, "seconds": seconds}
    return status, value, seconds, False


def run_calibration(args: argparse.Namespace, cache: dict[str, Any], cache_path: Path) -> list[dict[str, Any]]:
    """Sigma per accountant and fedtune's default, per setting and target epsilon, with pld certification."""
    rows: list[dict[str, Any]] = []
    vdi = args.pld_discretization
    start = time.perf_counter()
    delta = args.calib_delta
    # calibration results depend on the whole privacy module: key them by a hash of all its sources
    code = f"privacy={privacy_fingerprint()},dp-accounting={_version('dp-accounting')},opacus={_version('opacus')}"
    for setting in CALIBRATION_SETTINGS:
        q, steps = setting["q"], setting["steps"]
        for eps in args.calib_eps:
            block: list[dict[str, Any]] = []
            for name in [*(n for n in args.accountants if n != RAW), "fedtune-default"]:
                base = f"calib[{code}]|eps={eps!r}|delta={delta!r}|q={q!r}|steps={steps}"
                row: dict[str, Any] = {
                    "setting": setting["setting"],
                    "q": q,
                    "steps": steps,
                    "target_epsilon": eps,
                    "delta": delta,
                    "accountant": name,
                }
                if name == "fedtune-default":
                    status, value, seconds, cached = _cached_isolated(
                        f"{base}|fedtune-default",
                        cache,
                        _default_calibration,
                        (eps, delta, q, steps),
                        args.calib_timeout,
                    )
                    if status == "ok":
                        row |= {
                            "sigma": value["sigma"],
                            "sigma_estimate": value["sigma_estimate"],
                            "certifier_epsilon": value["certified_epsilon"],
                        }
                else:
                    status, value, seconds, cached = _cached_isolated(
                        f"{base}|{name}" + (f"[vdi={vdi!r}]" if name == "pld" else ""),
                        cache,
                        _sigma_for,
                        (name, vdi, eps, delta, q, steps),
                        args.calib_timeout,
                    )
                    if status == "ok":
                        row |= value
                row |= {
                    "status": status,
                    "error": None if status == "ok" else str(value),
                    "seconds": seconds,
                    "cached": cached,
                }
                if row.get("sigma") is not None:
                    c_status, c_value, _, _ = _cached_isolated(
                        f"certify|{setting_tag('pld', vdi)}|sigma={row['sigma']!r}|"
                        f"delta={delta!r}|q={q!r}|steps={steps}",
                        cache,
                        _certified_epsilon,
                        (vdi, row["sigma"], delta, q, steps),
                        args.timeout,
                    )
                    row["certified_epsilon"] = float(c_value) if c_status == "ok" else None
                    row["certify_error"] = None if c_status == "ok" else str(c_value)
                    row["meets_target"] = row["certified_epsilon"] is not None and row["certified_epsilon"] <= eps * (
                        1 + 1e-6
                    )
                save_cache(cache_path, cache, args.cache)
                block.append(row)
                print(
                    f"[calibration] {setting['setting']} eps={eps:g} {name}: "
                    + (
                        f"sigma={row['sigma']:.4f} pld eps={row.get('certified_epsilon')}"
                        if row.get("sigma")
                        else f"FAILED {row['error']}"
                    )
                    + f"{' (cached)' if cached else ''}  elapsed {time.perf_counter() - start:.1f}s",
                    file=sys.stderr,
                    flush=True,
                )
            rdp_sigma = next((r.get("sigma") for r in block if r["accountant"] == "rdp"), None)
            for r in block:
                r["noise_saved_vs_rdp"] = 1.0 - r["sigma"] / rdp_sigma if (rdp_sigma and r.get("sigma")) else None
            rows.extend(block)
    return rows


# --------------------------------------------------------------------------------------------------
# outputs
# --------------------------------------------------------------------------------------------------


def _fms(value: float | None) -> str:
    """Milliseconds: 3 significant digits below 100, whole numbers with separators above."""
    if value is None or not math.isfinite(value):
        return "—"
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def _f(value: float | None, fmt: str = ".4g", pct: bool = False) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    return f"{100 * value:{fmt}}%" if pct else f"{value:{fmt}}"


def write_csv(path: Path, rows: list[dict[str, Any]], accountants: Sequence[str]) -> None:
    """The grid, one row per cell, epsilon / gap / ms / status per accountant."""
    fields = ["q", "sigma", "steps", "delta", "q_steps"]
    for name in accountants:
        fields += [f"eps_{name}", f"gap_{name}", f"ms_{name}", f"status_{name}"]
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        for r in rows:
            line: dict[str, Any] = {k: r[k] for k in fields[:5]}
            for name in accountants:
                res = r["accountants"][name]
                line[f"eps_{name}"] = "" if res["epsilon"] is None else repr(res["epsilon"])
                line[f"gap_{name}"] = "" if res["gap"] is None else f"{res['gap']:.6g}"
                line[f"ms_{name}"] = (
                    "" if res["seconds"] is None or not math.isfinite(res["seconds"]) else f"{1e3 * res['seconds']:.4g}"
                )
                line[f"status_{name}"] = res["status"] if res["status"] == "ok" else f"{res['status']}: {res['error']}"
            writer.writerow(line)


def plot_gaps(path: Path, rows: list[dict[str, Any]], accountants: Sequence[str]) -> None:
    """Relative gap to pld vs q*steps, one panel per Edgeworth-family accountant, ±1% band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter

    names = [n for n in ANALYTIC if n in accountants]
    if not names or "pld" not in accountants:
        return
    sigmas = sorted({r["sigma"] for r in rows})
    deltas = sorted({r["delta"] for r in rows}, reverse=True)
    cmap = plt.get_cmap("viridis")
    colour = {s: cmap(i / max(1, len(sigmas) - 1)) for i, s in enumerate(sigmas)}
    marker_cycle = ["o", "^", "s", "D"]
    marker = {d: marker_cycle[i % len(marker_cycle)] for i, d in enumerate(deltas)}
    qs = sorted({r["q"] for r in rows})
    jitter = {q: 10 ** (0.06 * (i - (len(qs) - 1) / 2)) for i, q in enumerate(qs)}  # separate equal q*T
    ncols = 2 if len(names) == 4 else len(names)
    nrows = math.ceil(len(names) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.4 * ncols, 4.2 * nrows + 0.9), sharey=True, squeeze=False)
    any_fallback = False
    for ax, name in zip(axes.flat, names):
        ax.axhspan(-TOLERANCE, TOLERANCE, color="tab:green", alpha=0.15, lw=0)
        ax.axhline(0.0, color="k", lw=0.6)
        for bound in (-TOLERANCE, TOLERANCE):
            ax.axhline(bound, color="tab:green", lw=0.8, ls="--")
        for r in rows:
            g = r["accountants"][name]["gap"]
            if g is None:
                ax.plot(r["q_steps"] * jitter[r["q"]], 0.0, marker="x", color="tab:red", ms=7, ls="none")
                continue
            fallback = bool(r["accountants"][name].get("fallback"))
            any_fallback |= fallback
            ax.plot(
                r["q_steps"] * jitter[r["q"]],
                g,
                marker=marker[r["delta"]],
                ls="none",
                alpha=0.85,
                ms=5,
                color=colour[r["sigma"]],
                mfc="none" if fallback else colour[r["sigma"]],
                mec=colour[r["sigma"]] if fallback else "k",
                mew=1.0 if fallback else 0.3,
            )
        ax.set_xscale("log")
        ax.set_yscale("symlog", linthresh=TOLERANCE, linscale=1.0)
        ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{100 * y:+g}%" if y else "0"))
        title = {
            RAW: f"{RAW}: bare expansion, domain checks off (diagnostic)",
            "saddlepoint": "saddlepoint as shipped (hollow: answered by pld fallback)",
        }.get(name, f"{name} ({kind_of(name)})")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("expected inclusions q · steps (points spread slightly by q)")
        ax.grid(True, which="major", alpha=0.3)
    for ax in axes[:, 0]:
        ax.set_ylabel("(ε − ε_pld) / ε_pld  (symlog; linear within ±1%)", fontsize=9)
    for ax in list(axes.flat)[len(names) :]:
        ax.set_visible(False)
    handles = [Line2D([], [], marker="o", color=colour[s], ls="none", label=f"σ = {s:g}") for s in sigmas]
    handles += [Line2D([], [], marker=marker[d], color="grey", ls="none", label=f"δ = {d:g}") for d in deltas]
    handles += [
        Line2D([], [], color="tab:green", lw=6, alpha=0.3, label="±1% of pld"),
        Line2D([], [], marker="x", color="tab:red", ls="none", label="failed (plotted at 0)"),
    ]
    if any_fallback:
        handles.append(Line2D([], [], marker="o", color="grey", mfc="none", ls="none", label="pld fallback"))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    fig.suptitle("Edgeworth-family accountants vs the certified PLD reference (above 0: overstates, safe side)")
    fig.tight_layout(rect=(0, 0.9 / (4.2 * nrows + 0.9), 1, 0.96))
    fig.savefig(path, dpi=130)
    plt.close(fig)


def _json_safe(value: Any) -> Any:
    """Non-finite floats become None, paths and other objects strings (strict JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if value is None or isinstance(value, (str, int, bool)):
        return value
    return str(value)


def _git_state() -> str:
    """``<commit>`` plus ``+ uncommitted changes in privacy/`` when the working tree differs."""
    import subprocess

    root = Path(fedtune.privacy.__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "privacy"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (" + uncommitted changes in privacy/" if dirty else "")


def _describe_certifier() -> str:
    """Class and first docstring line of ``fedtune.privacy.calibration.certifier()``."""
    acc = certifier()
    doc = (type(acc).__doc__ or "").strip().splitlines()
    return f"{type(acc).__name__}" + (f" — {doc[0].rstrip('.')}" if doc else "")


def _versions() -> str:
    parts = [f"python {platform.python_version()}"]
    for pkg in ("numpy", "scipy", "dp-accounting", "opacus"):
        try:
            parts.append(f"{pkg} {importlib.metadata.version(pkg)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    return ", ".join(parts)


def markdown_report(
    meta: dict[str, Any],
    summary: list[dict[str, Any]],
    by_qt: list[dict[str, Any]],
    by_sigma: list[dict[str, Any]],
    rows: list[dict[str, Any]],
    calibration: list[dict[str, Any]],
    accountants: Sequence[str],
) -> str:
    """The markdown report."""
    g = meta["grid"]
    lines = [
        "# Accountant benchmark: accuracy against the certified PLD reference, cost, calibration",
        "",
        f"- Command: `{meta['command']}`",
        f"- Date: {meta['date']} (run time {meta['run_seconds'] / 60:.1f} min; "
        "reference results may come from the cache)",
        f"- Versions: {meta['versions']}; {meta['cpus']} CPU cores, shared with other jobs (timings are indicative)",
        f"- Code: fedtune.privacy sources sha256[:10] = {meta['privacy_fingerprint']} (git {meta['git']})",
        f"- Grid: q ∈ {g['q']}, σ ∈ {g['sigma']}, steps ∈ {g['steps']}, δ ∈ {g['delta']} → {len(rows)} cells",
        f"- Reference `pld`: dp_accounting PLD, pessimistic, both directions, value_discretization_interval = "
        f"{meta['pld_discretization']:g} (certified upper bound at any discretisation; coarser is looser).",
        f"- gap = (ε − ε_pld) / ε_pld; negative = understates the certified ε. Reference accountants are run once "
        f"per cell in a worker with a {meta['timeout']:g} s limit; "
        f"analytic ones: median of up to {meta['repeats']} warm "
        f"queries (fewer once {meta['time_budget']:g} s is spent), "
        "and a cold query (cumulant cache cleared) reported separately.",
        "",
        "## Summary",
        "",
        "| accountant | kind | cells | failures | pld fallbacks | max \\|gap\\| | median \\|gap\\| "
        "| within 1% | over > 1% | under > 1% | median ms | max ms | cold median ms | cold max ms |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in summary:
        ref = s["accountant"] == "pld"
        lines.append(
            f"| {s['accountant']} | {s['kind']} | {s['cells']} | {s['failures']} | "
            f"{s['fallbacks'] if s['accountant'].startswith('saddlepoint') else ''} | "
            f"{'(reference)' if ref else _f(s['max_abs_gap'], '.3g', pct=True)} | "
            f"{'' if ref else _f(s['median_abs_gap'], '.3g', pct=True)} | "
            f"{'' if ref else _f(s['within_1pct'], '.1f', pct=True)} | {'' if ref else s['over_1pct']} | "
            f"{'' if ref else s['under_1pct']} | "
            f"{_fms(s['median_ms'])} | {_fms(s['max_ms'])} | {_fms(s['cold_median_ms'])} | {_fms(s['cold_max_ms'])} |"
        )
    no_ref = sum(1 for r in rows if r["accountants"]["pld"]["epsilon"] is None)
    lines += [
        "",
        f"Cells with a pld reference: {len(rows) - no_ref} of {len(rows)} "
        "(the others are listed under Failures and left "
        'out of the statistics). "within 1%" counts failures as misses. rdp is a (looser) certified bound: its '
        "overstatements are expected. prv reports Opacus' upper estimate (ε + eps_error, eps_error = 0.01 absolute), "
        "which dominates its relative gap at small ε. ms per query: warm median (analytic accountants) or single "
        "run (reference accountants, run in a worker; library import excluded).",
        "",
    ]
    if HAS_FALLBACK:
        lines += [
            f"`saddlepoint` is the accountant as shipped: outside the expansion's domain (fewer than "
            f"{saddlepoint_module.MIN_TILTED_INCLUSIONS:g} expected tilted inclusions, a correction above "
            f"{saddlepoint_module.MAX_RELATIVE_CORRECTION:g} of the leading term, or a breakdown) it answers with the "
            'certified pld value ("pld fallbacks"; those queries cost a PLD run). '
            f"`{RAW}` is a diagnostic: the same accountant with those domain checks disabled, i.e. the bare "
            "expansion (a breakdown is recorded as a failure), to show what the fallback guards against.",
            "",
        ]

    lines += ["## Understatements of the certified ε by more than 1% (the dangerous direction)", ""]
    under = [(s["accountant"], c) for s in summary if s["accountant"] != "pld" for c in s["understated_cells"]]
    if under:
        lines += [
            "| accountant | q | σ | steps | δ | q·steps | ε | ε_pld | gap |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name, c in sorted(under, key=lambda x: (x[0], x[1]["gap"])):
            lines.append(
                f"| {name} | {c['q']:g} | {c['sigma']:g} | {c['steps']} | {c['delta']:g} | {c['q_steps']:g} | "
                f"{c['epsilon']:.5g} | {c['pld']:.5g} | {_f(c['gap'], '.2f', pct=True)} |"
            )
    else:
        lines.append("None: no accountant understates the certified ε by more than 1% on any cell.")
    lines.append("")

    failed = [(s["accountant"], c) for s in summary for c in s["failed_cells"]]
    lines += ["## Failures", ""]
    if failed:
        lines += ["| accountant | q | σ | steps | δ | status | error |", "|---|---:|---:|---:|---:|---|---|"]
        for name, c in failed:
            lines.append(
                f"| {name} | {c['q']:g} | {c['sigma']:g} | {c['steps']} | {c['delta']:g} | {c['status']} | "
                f"{str(c['error'])[:160]} |"
            )
    else:
        lines.append("None.")
    lines.append("")

    for title, table in (("expected inclusions q·steps", by_qt), ("σ", by_sigma)):
        lines += [
            f"## Where the Edgeworth family misses 1%, by {title}",
            "",
            "| accountant | bucket | cells | within 1% | over > 1% | under > 1% | failed | max \\|gap\\| | min gap |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for b in table:
            lines.append(
                f"| {b['accountant']} | {b['bucket']} | {b['cells']} | {b['within_1pct']} | {b['over_1pct']} | "
                f"{b['under_1pct']} | {b['failed']} | {_f(b['max_abs_gap'], '.3g', pct=True)} | "
                f"{_f(b['min_gap'], '.3g', pct=True)} |"
            )
        lines.append("")

    family = [n for n in ANALYTIC if n in accountants]
    misses = [
        r
        for r in rows
        if r["accountants"].get("pld", {}).get("epsilon") is not None
        and any(r["accountants"][n]["gap"] is None or abs(r["accountants"][n]["gap"]) > TOLERANCE for n in family)
    ]
    lines += [
        f"## Cells where an Edgeworth-family accountant misses 1% ({len(misses)} of {len(rows)})",
        "",
        "<details><summary>table</summary>",
        "",
        "| q | σ | steps | δ | q·steps | ε_pld | " + " | ".join(f"{n} gap" for n in family) + " |",
        "|---:|---:|---:|---:|---:|---:|" + "---:|" * len(family),
    ]
    for r in sorted(misses, key=lambda r: (r["q_steps"], r["sigma"], r["delta"])):
        cells = []
        for n in family:
            res = r["accountants"][n]
            cells.append(
                res["status"]
                if res["gap"] is None
                else (
                    f"**{_f(res['gap'], '.2f', pct=True)}**"
                    if abs(res["gap"]) > TOLERANCE
                    else _f(res["gap"], ".2f", pct=True)
                )
            )
        lines.append(
            f"| {r['q']:g} | {r['sigma']:g} | {r['steps']} | {r['delta']:g} | {r['q_steps']:g} | "
            f"{r['accountants']['pld']['epsilon']:.5g} | " + " | ".join(cells) + " |"
        )
    lines += ["", "</details>", ""]

    if calibration:
        lines += ["## Calibration: σ needed for a target ε", ""]
        for setting in CALIBRATION_SETTINGS:
            lines.append(f"- **{setting['setting']}**: {setting['description']}.")
        lines += [
            f"- δ = {calibration[0]['delta']:g}. σ per accountant = smallest σ that accountant alone accepts "
            '(`smallest_sigma`); "pld ε at σ" is the certified ε there '
            f"(pld, discretisation {meta['pld_discretization']:g}); "
            "fedtune-default = `calibrate_noise` "
            "(saddlepoint, then σ raised until fedtune's certifier meets the target; "
            f"certifier: {meta['certifier']}). Noise saved vs rdp = 1 − σ/σ_rdp.",
            "",
            "| setting | target ε | accountant | σ | pld ε at σ | meets target | noise saved vs rdp |",
            "|---|---:|---|---:|---:|---|---:|",
        ]
        for r in calibration:
            sigma = _f(r.get("sigma"), ".4f") if r["status"] == "ok" else f"{r['status']}: {str(r['error'])[:80]}"
            if r["accountant"] == "fedtune-default" and r.get("sigma_estimate") is not None:
                sigma += f" (estimate {r['sigma_estimate']:.4f})"
            if r.get("fallback_at_sigma"):
                sigma += " (pld fallback)"
            meets = "" if r.get("certified_epsilon") is None else ("yes" if r["meets_target"] else "**NO**")
            lines.append(
                f"| {r['setting']} | {r['target_epsilon']:g} | {r['accountant']} | {sigma} | "
                f"{_f(r.get('certified_epsilon'), '.4f')} | {meets} | "
                f"{_f(r.get('noise_saved_vs_rdp'), '.2f', pct=True)} |"
            )
        lines.append("")
    if meta.get("plot"):
        lines += [f"![gap vs q·steps]({meta['plot']})", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--quick", action="store_true", help="small grid (8 cells) and one calibration target, for a smoke test"
    )
    p.add_argument("--q", type=float, nargs="+", help=f"sampling rates (default {FULL_GRID['q']})")
    p.add_argument("--sigma", type=float, nargs="+", help=f"noise multipliers (default {FULL_GRID['sigma']})")
    p.add_argument("--steps", type=int, nargs="+", help=f"step counts (default {FULL_GRID['steps']})")
    p.add_argument("--delta", type=float, nargs="+", help=f"deltas (default {FULL_GRID['delta']})")
    p.add_argument(
        "--accountants",
        nargs="+",
        default=list(ALL_ACCOUNTANTS),
        choices=list(ALL_ACCOUNTANTS),
        help="accountants to run (pld is always added: it is the reference)",
    )
    p.add_argument("--repeats", type=int, default=5, help="warm repetitions per analytic query (median reported)")
    p.add_argument(
        "--time-budget",
        type=float,
        default=1.0,
        help="stop warm repetitions of an analytic query once this many seconds are spent (pld fallbacks are slow)",
    )
    p.add_argument("--timeout", type=float, default=120.0, help="seconds allowed per reference-accountant query")
    p.add_argument(
        "--pld-discretization",
        type=float,
        default=DEFAULT_PLD_DISCRETIZATION,
        help="value_discretization_interval of the pld reference (larger = faster, looser, still certified)",
    )
    p.add_argument("--calib-eps", type=float, nargs="+", help="calibration targets (default 1 3 8; --quick: 3)")
    p.add_argument("--calib-delta", type=float, default=1e-5, help="calibration delta")
    p.add_argument("--calib-timeout", type=float, default=900.0, help="seconds allowed per calibration search")
    p.add_argument("--no-calibration", dest="calibration", action="store_false", help="skip the calibration part")
    p.add_argument("--no-cache", dest="cache", action="store_false", help="neither read nor write the reference cache")
    p.add_argument("--no-plot", dest="plot", action="store_false", help="skip the PNG")
    p.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "results", help="output directory")
    p.add_argument("--name", help="output file stem (default accountants, or accountants_quick with --quick)")
    args = p.parse_args(argv)
    base = QUICK_GRID if args.quick else FULL_GRID
    args.grid = {k: (getattr(args, k) or base[k]) for k in ("q", "sigma", "steps", "delta")}
    args.calib_eps = args.calib_eps or ([3.0] if args.quick else [1.0, 3.0, 8.0])
    args.name = args.name or ("accountants_quick" if args.quick else "accountants")
    args.accountants = [n for n in ALL_ACCOUNTANTS if n in set(args.accountants) | {"pld"}]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and write its outputs."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("fedtune.privacy").propagate = False  # collected per query instead of printed
    logging.getLogger("fedtune.privacy").setLevel(logging.INFO)
    logging.getLogger("fedtune.privacy").addHandler(logging.NullHandler())
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out = {ext: args.out_dir / f"{args.name}.{ext}" for ext in ("json", "csv", "md")}
    png = args.out_dir / f"{args.name}_gap.png"
    cache_path = args.out_dir / f"{args.name}_cache.json"
    command = "python " + " ".join(
        shlex.quote(a)
        for a in [
            os.path.relpath(sys.argv[0]) if argv is None else "benchmarks/accountants.py",
            *(sys.argv[1:] if argv is None else argv),
        ]
    )
    started = dt.datetime.now(dt.UTC)
    t0 = time.perf_counter()
    cache = load_cache(cache_path, args.cache)
    print(
        f"{len(grid_cells(args.grid))} cells x {len(args.accountants)} accountants; "
        f"cache {cache_path} ({len(cache)} entries)",
        file=sys.stderr,
        flush=True,
    )

    warm_up(args)
    rows = run_grid(args, cache, cache_path)
    summary = summarize(rows, args.accountants)
    by_qt = miss_breakdown(rows, args.accountants, "q_steps")
    by_sigma = miss_breakdown(rows, args.accountants, "sigma")
    calibration = run_calibration(args, cache, cache_path) if args.calibration else []
    if args.plot:
        plot_gaps(png, rows, args.accountants)

    meta = {
        "command": command,
        "date": started.strftime("%Y-%m-%d %H:%M UTC"),
        "run_seconds": time.perf_counter() - t0,
        "versions": _versions(),
        "cpus": os.cpu_count(),
        "grid": args.grid,
        "accountants": args.accountants,
        "pld_discretization": args.pld_discretization,
        "timeout": args.timeout,
        "repeats": args.repeats,
        "time_budget": args.time_budget,
        "tolerance": TOLERANCE,
        "plot": png.name if args.plot else None,
        "privacy_fingerprint": privacy_fingerprint(),
        "git": _git_state(),
        "certifier": _describe_certifier(),
    }
    report = markdown_report(meta, summary, by_qt, by_sigma, rows, calibration, args.accountants)
    out["md"].write_text(report + "\n")
    write_csv(out["csv"], rows, args.accountants)
    payload = {
        "meta": meta,
        "summary": summary,
        "misses_by_q_steps": by_qt,
        "misses_by_sigma": by_sigma,
        "calibration": calibration,
        "calibration_settings": list(CALIBRATION_SETTINGS),
        "rows": rows,
    }
    out["json"].write_text(json.dumps(_json_safe(payload), indent=1, allow_nan=False))
    print(report)
    written = [*out.values(), *([png] if args.plot else []), *([cache_path] if args.cache else [])]
    print("wrote: " + ", ".join(str(p) for p in written), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
