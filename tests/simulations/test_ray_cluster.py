"""Ray clusters: ``fedtune simulate --ray-address`` on a real two-node cluster, and the private local runtime
that ``fedtune compare`` shares between its cells.

The cluster is started here with ``ray start`` (a head and one more node, one CPU each, on this machine)
in a private temp folder and on free ports, and stopped by stopping exactly its processes (found by
that folder or its GCS port), never with ``ray stop``, which would end every Ray instance of the machine.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

from fedtune.config import RunConfig
from fedtune.deployment import free_port
from fedtune.io import atomic_write_json, read_json
from fedtune.simulations.compare import run_grid
from fedtune.simulations.grid import GridSpec
from fedtune.simulations.ray_runtime import local_ray_cluster, runtime_processes, stop_processes

pytestmark = pytest.mark.slow

#: Connects to a cluster, prints its alive nodes, CPUs and jobs as JSON, disconnects.
STATE_SCRIPT = """
import json, sys
import ray
from ray._private import state
ray.init(address=sys.argv[1], log_to_driver=False, logging_level="ERROR")
jobs = [{"entrypoint": j.get("Entrypoint", ""), "dead": bool(j["IsDead"])} for j in state.jobs()]
nodes = sum(1 for n in ray.nodes() if n["Alive"])
print(json.dumps({"nodes": nodes, "cpus": ray.cluster_resources().get("CPU", 0.0), "jobs": jobs}))
ray.shutdown()
"""


def ray_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return {**env, "RAY_USAGE_STATS_ENABLED": "0"}


def cluster_state(address: str) -> dict[str, Any]:
    """Alive nodes, CPUs and jobs of the cluster at ``address``, from a separate driver process."""
    result = subprocess.run(
        [sys.executable, "-c", STATE_SCRIPT, address], capture_output=True, text=True, env=ray_env(), timeout=60
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def names(procs: list[psutil.Process]) -> list[str]:
    found = []
    for proc in procs:
        try:
            found.append(proc.name())
        except psutil.NoSuchProcess:
            pass
    return found


def live_children() -> list[str]:
    """Command lines of this process's children that still run."""
    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            if child.status() != psutil.STATUS_ZOMBIE:
                found.append(" ".join(child.cmdline()))
        except psutil.NoSuchProcess:
            pass
    return found


@dataclass(frozen=True)
class Cluster:
    """A Ray cluster started by the fixture."""

    port: int
    temp_dir: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def processes(self) -> list[psutil.Process]:
        return runtime_processes(self.temp_dir, also=(f":{self.port}",))


@pytest.fixture
def ray_cluster() -> Iterator[Cluster]:
    """A head node and one worker node with one CPU each; afterwards exactly their processes are stopped."""
    temp_dir = Path(tempfile.mkdtemp(prefix="ft-rc-", dir="/tmp"))  # short: Ray puts unix sockets in it
    cluster = Cluster(free_port(), temp_dir)
    ray = [sys.executable, "-m", "ray.scripts.scripts", "start"]
    common = ["--num-cpus", "1", "--node-ip-address", "127.0.0.1", "--temp-dir", str(temp_dir)]
    common += ["--disable-usage-stats", "--object-store-memory", str(200 * 2**20)]
    common += ["--dashboard-agent-listen-port", str(free_port()), "--metrics-export-port", str(free_port())]
    head = [*ray, "--head", "--port", str(cluster.port), "--include-dashboard=false"]
    head += ["--dashboard-port", str(free_port()), "--ray-client-server-port", str(free_port())]
    node = [*ray, "--address", cluster.address]
    try:
        for command in (head + common, node + common):
            started = subprocess.run(command, capture_output=True, text=True, env=ray_env(), timeout=120)
            assert started.returncode == 0, f"{' '.join(command)}:\n{started.stderr[-2000:]}"
        yield cluster
    finally:
        stop_processes(cluster.processes(), timeout=3.0)  # gcs_server may ignore SIGTERM: then SIGKILL
        left = names(cluster.processes())
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not left, f"processes of the test cluster survived: {left}"


def test_simulate_joins_a_two_node_cluster_and_leaves_it_running(
    ray_cluster: Cluster, glue_dir: Path, tmp_path: Path
) -> None:
    assert cluster_state(ray_cluster.address)["nodes"] == 2
    out = tmp_path / "run"
    # 2 clients x 1 CPU each on a cluster of 2 nodes x 1 CPU: Flower's pool has one actor per node
    command = [sys.executable, "-m", "fedtune.cli", "simulate", "--ray-address", ray_cluster.address]
    command += ["--clients", "2", "--rounds", "1", "--local-steps", "1", "--batch-size", "8"]
    command += ["--max-train-examples", "64", "--max-eval-examples", "64", "--epsilon", "8", "--out", str(out)]
    result = subprocess.run(
        command, capture_output=True, text=True, env={**ray_env(), "FEDTUNE_DATA_DIR": str(glue_dir)}, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]

    summary = read_json(out / "summary.json")
    assert [r["round"] for r in summary["rounds"]] == [0, 1]
    assert summary["rounds"][1]["clients_trained"] == 2 and summary["rounds"][1]["clients_rejected"] == 0
    assert sorted(int(c["id"]) for c in summary["clients"]) == [0, 1]
    assert all(int(c["steps"]) == 1 for c in summary["clients"])
    assert 0.0 < summary["composed_epsilon"] <= 8.0 * (1 + 1e-6)
    assert read_json(out / "config.json")["ray_address"] == ray_cluster.address

    # the run only disconnected: both nodes are still up, and the run was a job of this cluster
    after = cluster_state(ray_cluster.address)
    assert after["nodes"] == 2 and after["cpus"] == 2.0
    runs = [j for j in after["jobs"] if "fedtune.cli simulate" in j["entrypoint"]]
    assert len(runs) == 1 and runs[0]["dead"], after["jobs"]
    alive = names(ray_cluster.processes())
    assert alive.count("raylet") == 2 and alive.count("gcs_server") == 1, alive


def _runtime_temp_dir() -> Path:
    """The ``--temp-dir`` of the runtime head started by this process (see ``local_ray_cluster``)."""
    for child in psutil.Process().children():
        cmdline = child.cmdline()
        if "fedtune.simulations.ray_runtime" in cmdline:
            return Path(cmdline[cmdline.index("--temp-dir") + 1])
    raise AssertionError("no child process runs fedtune.simulations.ray_runtime")


def test_local_runtime_outlives_its_drivers_and_leaves_nothing_behind() -> None:
    with pytest.raises(KeyboardInterrupt):
        with local_ray_cluster(1) as address:
            temp_dir = _runtime_temp_dir()
            assert {"gcs_server", "raylet"} <= set(names(runtime_processes(temp_dir)))
            first = cluster_state(address)  # a driver connects, runs, disconnects ...
            second = cluster_state(address)  # ... and the runtime serves the next one
            assert first["nodes"] == second["nodes"] == 1 and second["cpus"] == 1.0
            assert len(second["jobs"]) >= 3  # the head's own driver, then the two above
            raise KeyboardInterrupt  # Ctrl-C in the middle of a grid
    assert names(runtime_processes(temp_dir)) == []
    assert not temp_dir.exists()
    assert live_children() == []


def test_local_runtime_rejects_a_bad_cpu_count() -> None:
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="num_cpus must be an integer >= 1"):
            with local_ray_cluster(bad):
                pass


def _fake_summary(config: RunConfig) -> dict[str, Any]:
    """What a finished run's summary.json holds, enough for compare's rows and plots."""
    clients = [{"id": str(k), "steps": 1, "examples": 32, "epsilon": 1.0, "epsilon_certified": 1.0} for k in range(2)]
    return {
        "metric": "accuracy",
        "final_accuracy": 0.6,
        "rounds": [{"round": 0, "accuracy": 0.5}, {"round": 1, "accuracy": 0.6, "clients_trained": config.clients}],
        "clients": clients[: config.clients],
        "composed_epsilon": 1.0 if math.isfinite(config.epsilon) else "inf",
        "seconds": 1.0,
        "finished": True,
    }


def test_compare_runs_every_cell_on_one_runtime(glue_dir: Path, tmp_path: Path) -> None:
    base = RunConfig(
        data_dir=str(glue_dir),
        clients=2,
        rounds=1,
        local_steps=1,
        batch_size=8,
        max_train_examples=64,
        max_eval_examples=32,
    )
    spec = GridSpec(base, (8.0, math.inf), ("iid",))
    seen: list[tuple[str, str | None, int]] = []

    def runner(config: RunConfig, resume: bool) -> dict[str, Any]:
        temp_dir = _runtime_temp_dir()  # the runtime is up while a cell runs
        seen.append((Path(config.out).name, config.ray_address, len(runtime_processes(temp_dir))))
        atomic_write_json(config.out_dir / "config.json", config.to_dict())  # as the server app does
        summary = _fake_summary(config)
        atomic_write_json(config.out_dir / "summary.json", summary)
        return summary

    rows = run_grid(spec, tmp_path / "grid", runner=runner, progress=lambda line: None)
    assert [r["status"] for r in rows] == ["ok"] * 4
    assert [name for name, _, _ in seen] == [r["cell"] for r in rows]
    addresses = {address for _, address, _ in seen}
    assert len(addresses) == 1 and None not in addresses  # one runtime for all four cells
    assert all(count > 0 for _, _, count in seen)
    for name, _, _ in seen:  # the temporary address is not kept: a later resume starts Ray of its own
        assert read_json(tmp_path / "grid" / "cells" / name / "config.json")["ray_address"] is None
    assert live_children() == []

    # a resumed grid with nothing left to run starts no runtime at all
    seen.clear()
    again = run_grid(spec, tmp_path / "grid", resume=True, runner=runner, progress=lambda line: None)
    assert seen == [] and [r["cell"] for r in again] == [r["cell"] for r in rows]
