"""End to end: secure aggregation (``--secure-aggregation``, Flower's SecAgg+) with the real model.

1. In process (no Ray): fedtune's real server loop (:func:`fedtune.server.app.run_server`) and three
   real fedtune ClientApps training all-MiniLM-L6-v2 with DP-SGD on an SST-2 slice, connected by
   :class:`inprocess_grid.InProcessGrid`, which also lets one client drop out mid-round. Checked:
   the secure aggregate equals plain FedAvg of the very updates the clients stored (within the
   quantization error), what the server received from a client is not its update, a client that
   drops out after sharing its keys leaves a round that aggregates the others, and both ledgers
   agree.
2. On Flower's Ray simulation engine: ``fedtune simulate --secure-aggregation
   --client-level-epsilon``: the run finishes with one server event per round and both ledgers agree.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import inprocess_grid
import numpy as np
import pytest
from flwr.common import bytes_to_ndarray, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.compat.common import recorddict_compat as compat

from fedtune.client.app import make_client_app
from fedtune.client.job import client_state_dir
from fedtune.client.privacy import ClientPrivacy
from fedtune.config import RunConfig
from fedtune.privacy.ledger import PrivacyLedger
from fedtune.server.checkpoint import load_checkpoint
from fedtune.server.secure import SecAggSettings

pytestmark = pytest.mark.slow

NODES = (101, 102, 103)  # partitions 0, 1, 2
DROPPED = 103


def _config(out: Path, data: Path, **changes: Any) -> RunConfig:
    settings: dict[str, Any] = {
        "task": "sst2",
        "data_dir": str(data),
        "clients": 3,
        "rounds": 2,
        "epsilon": 8.0,
        "max_train_examples": 120,
        "max_eval_examples": 64,
        "batch_size": 16,
        "local_steps": 2,
        "seed": 5,
        "dp_randomness": "seeded",
        "secure_aggregation": True,
        "out": str(out),
        **changes,
    }
    return RunConfig(**settings)


@pytest.fixture(scope="module")
def secure_run(tmp_path_factory: pytest.TempPathFactory, glue_dir: Path) -> dict[str, Any]:
    from flwr.supercore.task_identity import TaskIdentity

    from fedtune.server.app import run_server

    config = _config(tmp_path_factory.mktemp("secure") / "run", glue_dir)
    app = make_client_app(config)
    grid = inprocess_grid.InProcessGrid(
        dict.fromkeys(NODES, app),
        node_configs={node: {"partition-id": i, "num-partitions": len(NODES)} for i, node in enumerate(NODES)},
        # round 2: the third client drops out after the key exchange, before it sends its masked update
        drop=lambda stage, node: node == DROPPED and stage == Stage.COLLECT_MASKED_VECTORS and _round[0] == 2,
    )
    _round = [0]
    original = grid.push_messages

    def push(messages: Any) -> list[str]:
        messages = list(messages)
        if messages and inprocess_grid.stage_of(messages[0]) == Stage.SETUP:
            _round[0] += 1
        return original(messages)

    grid.push_messages = push  # type: ignore[method-assign]
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    try:
        summary = run_server(grid, config)  # type: ignore[arg-type]
    finally:
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved
    return {"config": config, "grid": grid, "summary": summary}


def _sent_global(grid: inprocess_grid.InProcessGrid, rnd: int) -> list[np.ndarray]:
    """The global weights the server sent to the clients in round ``rnd`` (stage 2's FitIns)."""
    stage2 = [m for stage, _, m, _ in grid.log if stage == Stage.COLLECT_MASKED_VECTORS]
    message = stage2[(rnd - 1) * len(NODES)]
    return parameters_to_ndarrays(compat.recorddict_to_fitins(message.content, keep_input=True).parameters)


def _stored_update(config: RunConfig, partition: int, rnd: int) -> list[np.ndarray]:
    """The update the client recorded (and masked) in round ``rnd``, in the global model's key order."""
    client = str(partition)
    guard = ClientPrivacy(client, client_state_dir(config, client), config.epsilon, config.delta, config.accountant)
    update = guard.paid_update(rnd)
    assert update is not None
    keys = list(load_checkpoint(config.out_dir / "checkpoint").arrays)  # type: ignore[union-attr]
    return [update[k].astype(np.float64) for k in keys]


def _fedavg(updates: dict[int, list[np.ndarray]], examples: dict[int, int]) -> list[np.ndarray]:
    total = sum(examples[p] for p in updates)
    return [
        sum(examples[p] * u[i] for p, u in updates.items()) / total for i in range(len(next(iter(updates.values()))))
    ]


def _tolerance(config: RunConfig, examples: dict[int, int], parts: list[int]) -> float:
    settings = SecAggSettings.from_config(config, largest_shard=max(examples.values()))
    return len(parts) * settings.step / sum(examples[p] / settings.max_weight for p in parts) + 1e-6


def test_secure_run_finishes_and_reports(secure_run: dict[str, Any]) -> None:
    summary = secure_run["summary"]
    assert summary["finished"] and not summary["failed"] and summary["rounds_done"] == 2
    assert [r["clients_trained"] for r in summary["rounds"][1:]] == [3, 2]  # round 2: one client dropped out
    block = summary["secure_aggregation"]
    assert block["weights"] == "examples" and block["clipping_range"] == 8.0
    assert block["max_weight"] == max(c["examples"] for c in summary["clients"])
    assert math.isfinite(summary["final_accuracy"]) and 0 < summary["composed_epsilon"] <= 8.0


def test_secure_aggregate_equals_fedavg_of_the_clients_updates(secure_run: dict[str, Any]) -> None:
    config, grid, summary = secure_run["config"], secure_run["grid"], secure_run["summary"]
    examples = {int(c["id"]): int(c["examples"]) for c in summary["clients"]}
    # round 1: the global model the server sent in round 2 is FedAvg of the three updates of round 1
    expected = _fedavg({p: _stored_update(config, p, 1) for p in range(3)}, examples)
    got = _sent_global(grid, 2)
    error = max(float(np.max(np.abs(g - e))) for g, e in zip(got, expected, strict=True))
    assert error < _tolerance(config, examples, [0, 1, 2]), error
    # and it moved: the round really averaged trained updates
    start = _sent_global(grid, 1)
    assert max(float(np.max(np.abs(g - s))) for g, s in zip(got, start, strict=True)) > 1e-3


def test_a_client_dropping_out_mid_round_leaves_the_others_aggregated(secure_run: dict[str, Any]) -> None:
    config, grid, summary = secure_run["config"], secure_run["grid"], secure_run["summary"]
    examples = {int(c["id"]): int(c["examples"]) for c in summary["clients"]}
    assert (Stage.SHARE_KEYS, DROPPED) in grid.delivered  # it shared its keys in round 2 ...
    assert grid.delivered.count((Stage.COLLECT_MASKED_VECTORS, DROPPED)) == 1  # ... but sent no update then
    final = [a.astype(np.float64) for a in load_checkpoint(config.out_dir / "checkpoint").arrays.values()]  # type: ignore[union-attr]
    expected = _fedavg({p: _stored_update(config, p, 2) for p in (0, 1)}, examples)
    error = max(float(np.max(np.abs(f - e))) for f, e in zip(final, expected, strict=True))
    assert error < _tolerance(config, examples, [0, 1]), error
    dropped = str(NODES.index(DROPPED))
    server = PrivacyLedger.load(config.out_dir / "ledger.json")
    assert server.rounds(dropped) == [1] and server.rounds("0") == server.rounds("1") == [1, 2]
    for client in ("0", "1", "2"):  # both ledgers hold the same events
        own = PrivacyLedger.load(client_state_dir(config, client) / "ledger.json")
        assert own.rounds(client) == server.rounds(client)
        assert own.composition(client) == server.composition(client)


def test_what_the_server_received_is_not_the_update(secure_run: dict[str, Any]) -> None:
    config, grid = secure_run["config"], secure_run["grid"]
    replies = [(n, r) for stage, n, _, r in grid.log if stage == Stage.COLLECT_MASKED_VECTORS and not r.has_error()]
    node, reply = replies[0]  # round 1, partition 0
    assert not any(len(record) for record in reply.content.array_records.values())
    masked = [bytes_to_ndarray(b) for b in reply.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]]  # type: ignore[union-attr]
    vector = np.concatenate([a.ravel() for a in masked[1:]]).astype(np.float64)
    start = _sent_global(grid, 1)
    update = np.concatenate([(u - s).ravel() for u, s in zip(_stored_update(config, NODES.index(node), 1), start)])
    assert vector.size == update.size and np.any(update != 0)
    n = vector.size
    assert abs(np.corrcoef(vector, update)[0, 1]) < 5 / math.sqrt(n)  # uncorrelated with the update
    assert abs(vector.mean() / 2**31 - 1) < 5 * 0.577 / math.sqrt(n)  # uniform on [0, 2**32)


def test_simulate_with_secure_aggregation_and_client_level_dp(tmp_path: Path, glue_dir: Path) -> None:
    out = tmp_path / "run"
    args = ["--task", "sst2", "--clients", "3", "--rounds", "2", "--epsilon", "8", "--max-train-examples", "120"]
    args += ["--max-eval-examples", "64", "--local-steps", "2", "--batch-size", "16", "--seed", "4"]
    args += ["--secure-aggregation", "--client-level-epsilon", "10", "--update-clipping-norm", "0.05"]
    env = {**os.environ, "FEDTUNE_DATA_DIR": str(glue_dir)}
    command = [sys.executable, "-m", "fedtune.cli", "simulate", *args, "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["finished"] and not summary["failed"] and summary["rounds_done"] == 2
    assert summary["secure_aggregation"]["weights"] == "uniform" and summary["secure_aggregation"]["max_weight"] == 1
    level = summary["client_level"]
    assert level["server_releases"] == 2 and 0 < summary["client_level_epsilon"] <= 10.0
    server = PrivacyLedger.load(out / "ledger.json")
    assert sorted(server.server_events()) == [1, 2]
    config = RunConfig.from_dict({**json.loads((out / "config.json").read_text())})
    for client in ("0", "1", "2"):
        own = PrivacyLedger.load(client_state_dir(config, client) / "ledger.json")
        assert own.rounds(client) == server.rounds(client) == [1, 2]
        assert own.composition(client) == server.composition(client)
