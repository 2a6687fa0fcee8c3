"""Ctrl-C on a run: it stops within seconds, says so once, leaves no process, keeps every finished round."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.slow

ARGS = [
    "--rounds",
    "4",
    "--local-steps",
    "2",
    "--batch-size",
    "8",
    "--max-train-examples",
    "64",
    "--max-eval-examples",
    "64",
    "--epsilon",
    "8",
]


def _start(command: list[str], glue_dir: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "FEDTUNE_DATA_DIR": str(glue_dir), "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "fedtune.cli", *command],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,  # its own process group, as a terminal's foreground job
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # a terminal job takes Ctrl-C
    )


def _wait_for(path: Path, process: subprocess.Popen[str], timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            raise AssertionError(f"the run ended before {path} appeared:\n{process.stderr.read()[-3000:]}")  # type: ignore[union-attr]
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"{path} did not appear within {timeout:g} s")
        time.sleep(0.3)


def _interrupt(process: subprocess.Popen[str]) -> tuple[float, str, list[psutil.Process]]:
    """Send SIGINT; returns the seconds until exit, stderr and the descendants that were running."""
    descendants = psutil.Process(process.pid).children(recursive=True)
    os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole process group
    started = time.monotonic()
    _, err = process.communicate(timeout=60)
    return time.monotonic() - started, err, descendants


def _still_running(processes: list[psutil.Process], grace: float = 10.0) -> list[psutil.Process]:
    deadline = time.monotonic() + grace
    while True:
        alive = [p for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.5)


def test_ctrl_c_stops_quickly_keeps_rounds_and_resume_completes(tmp_path: Path, glue_dir: Path) -> None:
    out = tmp_path / "run"
    process = _start(["simulate", "--clients", "2", *ARGS, "--out", str(out)], glue_dir)
    _wait_for(out / "checkpoint" / "state.json", process)
    seconds, err, descendants = _interrupt(process)

    assert process.returncode == 130
    assert seconds < 15, f"took {seconds:.1f} s to stop"
    assert "Traceback" not in err, err[-3000:]
    assert err.count("fedtune: interrupted") == 1 and f"--resume {out}" in err
    assert descendants, "a simulation starts Ray processes"
    assert not _still_running(descendants), "Ray processes outlived the run"

    # every finished round is on disk: checkpoint, metrics.csv, plot and a partial summary
    summary = json.loads((out / "summary.json").read_text())
    done = summary["rounds_done"]
    assert summary["finished"] is False and 1 <= done < 4
    assert len((out / "metrics.csv").read_text().strip().splitlines()) == 1 + 1 + done  # header, round 0, rounds
    assert (out / "plot.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "checkpoint" / "state.json").read_text())["round"] == done

    resumed = _start(["simulate", "--resume", str(out)], glue_dir)
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["finished"] is True and summary["rounds_done"] == 4
    assert [r["round"] for r in summary["rounds"]] == [0, 1, 2, 3, 4]
    assert 7.0 < summary["composed_epsilon"] <= 8.0  # the budget is spent over all four rounds, never beyond


def test_ctrl_c_stops_a_compare_grid_and_its_ray_runtime(tmp_path: Path, glue_dir: Path) -> None:
    out = tmp_path / "grid"
    command = [
        "compare",
        "--clients",
        "2",
        "--epsilons",
        "8",
        "--partitions",
        "iid",
        "--no-centralized",
        *ARGS[:-2],
        "--out",
        str(out),
    ]  # ARGS without --epsilon
    process = _start(command, glue_dir)
    _wait_for(out / "cells" / "federated-iid-eps8-seed0" / "checkpoint" / "state.json", process)
    seconds, err, descendants = _interrupt(process)
    assert process.returncode == 130 and seconds < 15, f"exit {process.returncode} after {seconds:.1f} s"
    assert "Traceback" not in err and err.count("fedtune: interrupted") == 1 and f"--resume {out}" in err
    assert not _still_running(descendants), "Ray processes outlived the grid"
