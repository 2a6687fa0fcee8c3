"""``fedtune compare``: run a privacy-utility grid cell by cell, resumable, with tables and plots.

Each cell is an ordinary run (:func:`fedtune.simulations.simulate.simulate`) in ``OUT/cells/<cell name>/`` with
all of a run's outputs. After every cell the grid's outputs are rewritten atomically:

* ``grid.json``: the grid's settings (``--resume OUT`` reads them back);
* ``results.json`` and ``results.csv``: one row per cell (setting, partition, seed, epsilon target,
  certified epsilon reached, the task metric, examples processed, time, status);
* ``results.md``: the table, averaged over seeds (with the min-max spread when there are several);
* ``accuracy_vs_epsilon.png`` and ``epsilon_spread.png``.

A cell whose ``summary.json`` says it finished is never rerun; a cell interrupted mid-way resumes
from its last checkpoint (its ledgers make sure no privacy is counted twice); a failed cell is
recorded as failed and retried on resume.

Unless the grid names a Ray cluster (``--ray-address``), all cells run on one private local Ray
runtime (:func:`fedtune.simulations.ray_runtime.local_ray_cluster`), started before the first cell
that has to run and stopped after the last, instead of Ray starting and stopping once per cell. Its
address is temporary: a cell's ``config.json`` is written back without it once the cell ends, so
``fedtune simulate --resume OUT/cells/<cell name>`` starts Ray of its own.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedtune.config import RunConfig
from fedtune.io import atomic_write_json, read_json
from fedtune.simulations.grid import Cell, GridSpec

__all__ = ["run_grid", "cell_row", "Runner"]

log = logging.getLogger(__name__)

#: ``runner(config, resume=...) -> summary``; :func:`fedtune.simulations.simulate.simulate` by default.
Runner = Callable[..., dict[str, Any]]


def _finite_or_inf(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.inf


def cell_row(
    cell: Cell, config: RunConfig, summary: dict[str, Any] | None, *, error: str | None = None
) -> dict[str, Any]:
    """One ``results.csv`` row for a cell from its ``summary.json`` (or its error)."""
    from fedtune.workload import local_plan

    row: dict[str, Any] = {
        "cell": cell.name,
        "seed": cell.seed,
        "setting": cell.setting,
        "partition": cell.partition,
        "clients": config.clients,
        "epsilon_target": cell.epsilon,
        "delta": config.delta,
    }
    if summary is None:
        return {**row, "status": "failed", "error": error or "unknown error"}
    metric = summary.get("metric", "accuracy")
    clients = summary.get("clients", [])
    rounds_done = max(int(r["round"]) for r in summary["rounds"])
    # expected examples = steps x expected batch B_k (min(B, N_k), or q N_k), per client: the ledger's steps for a
    # private run, the planned steps per round x rounds for a non-private one (no ledger; its
    # summary's steps count only the rounds of the last process when the cell was resumed)
    expected = sum(
        ((int(c["steps"]) if config.private else 0) or local_plan(config, int(c["examples"]))[1] * rounds_done)
        * config.client_batch_size(int(c["examples"]))
        for c in clients
    )
    row.update(
        {
            "epsilon_certified": _finite_or_inf(summary.get("composed_epsilon")),
            "epsilon_estimate": max((_finite_or_inf(c.get("epsilon")) for c in clients), default=math.inf),
            "metric": metric,
            "value": float(summary["final_accuracy"]),
            "accuracy": float(summary.get("final_metrics", {}).get("accuracy", summary["final_accuracy"])),
            "initial_value": float(summary["rounds"][0][metric]),
            "rounds_completed": rounds_done,
            "examples_processed": expected,
            "seconds": float(summary.get("seconds", math.nan)),
            "client_epsilons": [_finite_or_inf(c.get("epsilon_certified")) for c in clients],
            "client_level_epsilon": _finite_or_inf(summary.get("client_level_epsilon")),
            "rejected_updates": len(summary.get("rejected_updates", [])),
            "status": "stopped early" if summary.get("stopped_early") else "ok",
            "error": "",
        }
    )
    sampled = config.sampled_clients < config.clients  # client-level DP's Poisson sampling: fewer is the plan
    short = [
        int(r["round"])
        for r in summary["rounds"][1:]
        if not sampled and int(r.get("clients_trained", config.clients)) < config.clients
    ]
    if row["rejected_updates"] or short:
        # e.g. a worker killed by Ray's out-of-memory monitor: the cell did not train what it planned
        row["status"] = "degraded"
        row["error"] = (
            f"{row['rejected_updates']} update(s) rejected; fewer than {config.clients} clients trained in round(s) "
            f"{', '.join(map(str, short)) or '-'}; see cells/{cell.name}/summary.json "
            "(delete the folder and --resume to rerun)"
        )
    return row


def _check_cells(spec: GridSpec, out: Path) -> None:
    """Build and check every distinct cell setup before any training (clear errors, exit 2)."""
    from fedtune.simulations.simulate import check_workload

    seen: set[tuple[Any, ...]] = set()
    for cell in spec.cells():
        config = spec.config(cell, out / "cells" / cell.name)
        key = (cell.setting, cell.partition, cell.seed, config.private)
        if key not in seen:
            seen.add(key)
            check_workload(config)


def run_grid(
    spec: GridSpec,
    out: str | Path,
    *,
    resume: bool = False,
    runner: Runner | None = None,
    progress: Callable[[str], None] = print,
    shared_ray: bool = True,
) -> list[dict[str, Any]]:
    """Run (or continue) the grid ``spec`` in ``out``; returns the result rows in grid order.

    Parameters
    ----------
    spec : GridSpec
        The grid.
    out : path
        Output folder (``grid.json``, ``results.*``, plots, ``cells/<name>/``).
    resume : bool
        Continue the grid stored in ``out``; finished cells are skipped, not redone.
    runner : callable, optional
        ``runner(config, resume=bool) -> summary``; default :func:`fedtune.simulations.simulate.simulate`.
    progress : callable
        Receives one line per cell.
    shared_ray : bool
        When the grid names no Ray cluster (``spec.base.ray_address`` is None), run every cell on one
        private local Ray runtime, started before the first cell that has to run and stopped at the end
        (also on an error or Ctrl-C); the runner then receives configs with its ``ray_address``. False:
        each cell's run starts and stops Ray itself (e.g. for a runner that does not use Ray).

    Raises
    ------
    ValueError
        ``out`` already holds a grid and ``resume`` is False; ``resume`` without a grid there, or with
        different settings; a cell that cannot run (see :func:`fedtune.simulations.simulate.check_workload`).
    """
    from fedtune.simulations.compare_report import write_grid_outputs

    if runner is None:
        from fedtune.simulations.simulate import simulate

        runner = simulate
    out = Path(out)
    grid_file = out / "grid.json"
    if grid_file.exists() and not resume:
        raise ValueError(f"{out} already holds a grid; pass --resume {out} to continue it or choose another --out")
    if resume:
        if not grid_file.exists():
            raise ValueError(f"--resume {out}: no grid found there (expected {grid_file})")
        stored = GridSpec.from_dict(read_json(grid_file))
        if stored != spec:
            raise ValueError(f"--resume {out}: the grid stored there has other settings than the ones given")
    _check_cells(spec, out)
    atomic_write_json(grid_file, spec.to_dict())
    cells = spec.cells()
    rows: dict[str, dict[str, Any]] = {}
    with contextlib.ExitStack() as runtime:
        address = spec.base.ray_address  # None: our own runtime, started when a cell first has to run
        for index, cell in enumerate(cells, 1):
            cell_dir = out / "cells" / cell.name
            config = spec.config(cell, cell_dir)
            tag = f"[{index}/{len(cells)}] {cell.name}"
            earlier = read_json(cell_dir / "summary.json") if (cell_dir / "summary.json").exists() else None
            if earlier is not None and earlier.get("finished", True) and not earlier.get("failed"):
                rows[cell.name] = cell_row(cell, config, earlier)
                progress(f"{tag}: finished earlier, skipped")
                continue
            if address is None and shared_ray:
                from fedtune.simulations.ray_runtime import local_ray_cluster

                address = runtime.enter_context(local_ray_cluster())
            interrupted = (cell_dir / "checkpoint" / "state.json").exists()
            progress(f"{tag}: {'resuming from its checkpoint' if interrupted else 'running'} ...")
            started = time.perf_counter()
            try:
                summary = runner(config.replace(ray_address=address), resume=interrupted)
            except KeyboardInterrupt:
                raise
            except Exception as err:  # one failed cell must not lose the others' results
                log.exception("cell %s failed", cell.name)
                rows[cell.name] = cell_row(cell, config, None, error=f"{type(err).__name__}: {err}")
                progress(f"{tag}: FAILED after {time.perf_counter() - started:.0f} s: {err}")
            else:
                rows[cell.name] = row = cell_row(cell, config, summary)
                progress(
                    f"{tag}: {row['metric']} {row['value']:.4f}, epsilon certified "
                    f"{_fmt_eps(row['epsilon_certified'])}, {time.perf_counter() - started:.0f} s"
                )
            finally:
                if address is not None and address != spec.base.ray_address:
                    _forget_address(cell_dir / "config.json", address)
            write_grid_outputs(out, spec, [rows[c.name] for c in cells if c.name in rows])
    ordered = [rows[c.name] for c in cells]
    write_grid_outputs(out, spec, ordered)
    return ordered


def _forget_address(config_file: Path, address: str) -> None:
    """Write ``config_file`` back without the temporary Ray ``address`` (a later resume starts Ray of its own)."""
    if not config_file.exists():
        return
    stored = read_json(config_file)
    if stored.get("ray_address") == address:
        atomic_write_json(config_file, {**stored, "ray_address": None})


def _fmt_eps(value: float) -> str:
    return "inf (no DP)" if math.isinf(value) else f"{value:.3f}"
