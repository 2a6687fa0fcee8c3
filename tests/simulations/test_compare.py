"""End to end: ``fedtune compare`` on a small real grid (2 budgets x 2 settings, tiny SST-2 slices).

The grid is first interrupted (Ctrl-C) while its third cell starts, then resumed with the CLI's
``--resume``: finished cells must be skipped, not redone, and every output must be written.
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fedtune.config import RunConfig
from fedtune.simulations.compare import run_grid
from fedtune.simulations.grid import GridSpec
from fedtune.simulations.simulate import simulate

pytestmark = pytest.mark.slow

BASE = dict(
    task="sst2",
    clients=2,
    rounds=1,
    local_steps=2,
    batch_size=8,
    max_train_examples=64,
    max_eval_examples=32,
    max_length=64,
    learning_rate=5e-3,
    seed=5,
)


@pytest.fixture(scope="module")
def grid(
    tmp_path_factory: pytest.TempPathFactory, glue_dir: Path
) -> tuple[Path, list[str], subprocess.CompletedProcess[str]]:
    out = tmp_path_factory.mktemp("compare") / "grid"
    spec = GridSpec(RunConfig(data_dir=str(glue_dir), **BASE), (8.0, math.inf), ("iid",))
    ran: list[str] = []

    def interrupted(config: RunConfig, resume: bool) -> dict[str, Any]:
        if len(ran) == 2:
            raise KeyboardInterrupt  # the user stops the grid as its third cell starts
        ran.append(Path(config.out).name)
        return simulate(config, resume=resume)

    with pytest.raises(KeyboardInterrupt):
        run_grid(spec, out, runner=interrupted, progress=lambda line: None)
    assert ran == ["centralized-eps8-seed5", "centralized-epsinf-seed5"]
    partial = list(csv.DictReader((out / "results.csv").open()))
    assert [r["cell"] for r in partial] == ran  # what finished is on disk
    env = {**os.environ, "FEDTUNE_DATA_DIR": str(glue_dir)}
    again = subprocess.run(
        [sys.executable, "-m", "fedtune.cli", "compare", "--out", str(out), "--epsilons", "8", "--partitions", "iid"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert again.returncode == 2 and "already holds a grid; pass --resume" in again.stderr
    resumed = subprocess.run(
        [sys.executable, "-m", "fedtune.cli", "compare", "--resume", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return out, ran, resumed


def test_resume_skips_finished_cells(grid: tuple[Path, list[str], subprocess.CompletedProcess[str]]) -> None:
    out, ran, resumed = grid
    assert "[1/4] centralized-eps8-seed5: finished earlier, skipped" in resumed.stdout
    assert "[2/4] centralized-epsinf-seed5: finished earlier, skipped" in resumed.stdout
    assert "[3/4] federated-iid-eps8-seed5: running" in resumed.stdout
    for name in ran:  # the finished cells were not run again: one round-1 entry in their metrics
        assert len((out / "cells" / name / "metrics.csv").read_text().strip().splitlines()) == 3


def test_grid_writes_every_output(grid: tuple[Path, list[str], subprocess.CompletedProcess[str]]) -> None:
    out, _, resumed = grid
    for name in (
        "grid.json",
        "results.json",
        "results.csv",
        "results.md",
        "accuracy_vs_epsilon.png",
        "epsilon_spread.png",
    ):
        assert (out / name).exists(), name
    for name in ("accuracy_vs_epsilon.png", "epsilon_spread.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = {r["cell"]: r for r in csv.DictReader((out / "results.csv").open())}
    assert list(rows) == [
        "centralized-eps8-seed5",
        "centralized-epsinf-seed5",
        "federated-iid-eps8-seed5",
        "federated-iid-epsinf-seed5",
    ]
    for name, row in rows.items():
        assert row["status"] == "ok", row
        assert 0.0 <= float(row["value"]) <= 1.0 and row["metric"] == "accuracy"
        assert float(row["seconds"]) > 0
        assert (out / "cells" / name / "summary.json").exists() and (
            out / "cells" / name / "adapter" / "adapter_config.json"
        ).exists()
        cell_summary = json.loads((out / "cells" / name / "summary.json").read_text())
        for client in cell_summary["clients"]:  # q, sigma and the steps each client trained, DP or not
            assert client["steps"] >= 2 and client["sampling_rate"] > 0
            assert (client["noise_multiplier"] == 0.0) == name.endswith("epsinf-seed5")
        # same compute in every cell: 2 clients x 2 steps x 8 = centralized 4 steps x 8
        assert int(row["examples_processed"]) == 32
    for setting in ("centralized", "federated-iid"):
        private = rows[f"{setting}-eps8-seed5"]
        assert 0.0 < float(private["epsilon_certified"]) <= 8.0 * (1 + 1e-6)
        assert float(private["epsilon_certified"]) > 0.5 * 8.0  # the budget is used, not wasted
        assert rows[f"{setting}-epsinf-seed5"]["epsilon_certified"] == "inf"
    results = json.loads((out / "results.json").read_text())
    fed = next(r for r in results["rows"] if r["cell"] == "federated-iid-eps8-seed5")
    assert len(fed["client_epsilons"]) == 2 and max(fed["client_epsilons"]) == pytest.approx(
        float(rows["federated-iid-eps8-seed5"]["epsilon_certified"])
    )
    table = (out / "results.md").read_text()
    assert "| centralized | 8 |" in table and "| federated iid | inf | — (no DP) |" in table
    assert "| setting |" in resumed.stdout  # the table is printed at the end
