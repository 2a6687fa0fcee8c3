"""The compare grid: parsing, cells, and how compute and privacy are matched between settings."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

from fedtune.config import RunConfig
from fedtune.simulations.grid import Cell, GridSpec, parse_epsilons, parse_partitions, parse_seeds


def test_parse_epsilons_sorts_and_keeps_inf() -> None:
    assert parse_epsilons("8, 1,3,inf,8") == (1.0, 3.0, 8.0, math.inf)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "empty"),
        (" , ", "empty"),
        ("1,-3", "'-3'"),
        ("0", "'0'"),
        ("nan", "'nan'"),
        ("1,abc", "'abc'"),
    ],
)
def test_bad_epsilon_lists_are_refused_naming_the_value(text: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        parse_epsilons(text)


def test_parse_partitions_canonical_and_unknown() -> None:
    assert parse_partitions("iid, Dirichlet:0.50,dirichlet") == ("iid", "dirichlet:0.5")
    for bad in ("kmeans", "iid:3", "dirichlet:-1", "dirichlet:x"):
        with pytest.raises(ValueError, match="partition|alpha|iid|Dirichlet"):
            parse_partitions(bad)
    with pytest.raises(ValueError, match="empty"):
        parse_partitions("")


def test_parse_seeds() -> None:
    assert parse_seeds("1,0,1") == (1, 0)
    for bad in ("", "-1", "a"):
        with pytest.raises(ValueError, match="seed"):
            parse_seeds(bad)


def test_cells_order_and_names() -> None:
    spec = GridSpec(RunConfig(clients=4), (8.0, math.inf), ("iid", "dirichlet:0.5"), (0, 1))
    cells = spec.cells()
    assert len(cells) == 2 * 3 * 2
    assert cells[0] == Cell("centralized", "pooled", 8.0, 0)
    assert [c.name for c in cells[:6]] == [
        "centralized-eps8-seed0",
        "centralized-epsinf-seed0",
        "federated-iid-eps8-seed0",
        "federated-iid-epsinf-seed0",
        "federated-dirichlet0.5-eps8-seed0",
        "federated-dirichlet0.5-epsinf-seed0",
    ]
    assert len({c.name for c in cells}) == len(cells)
    assert GridSpec.from_dict(spec.to_dict()) == spec


def test_a_grid_needs_settings_and_clients() -> None:
    with pytest.raises(ValueError, match="no settings"):
        GridSpec(RunConfig(), (8.0,), (), centralized=False)
    with pytest.raises(ValueError, match="at least 2 clients"):
        GridSpec(RunConfig(clients=1), (8.0,), ("iid",))


def test_cell_configs_change_only_what_the_cell_says(tmp_path: Path) -> None:
    base = RunConfig(clients=4, rounds=3, local_steps=5, batch_size=16, learning_rate=1e-3, lora_rank=4)
    spec = GridSpec(base, (3.0,), ("dirichlet:0.3",), (7,))
    central, federated = (spec.config(c, tmp_path / c.name) for c in spec.cells())
    assert federated == base.replace(
        partition="dirichlet:0.3", epsilon=3.0, seed=7, out=str(tmp_path / "federated-dirichlet0.3-eps3-seed7")
    )
    # centralized: one client, K x S steps per round (same K*S*B examples), the rest unchanged
    assert central.clients == 1 and central.local_steps == 4 * 5
    assert (
        central.rounds,
        central.batch_size,
        central.learning_rate,
        central.lora_rank,
        central.epsilon,
        central.seed,
    ) == (3, 16, 1e-3, 4, 3.0, 7)


@pytest.mark.slow
def test_epoch_based_cells_process_the_same_examples(tmp_path: Path, glue_dir: Path) -> None:
    from fedtune.workload import get_workload

    base = RunConfig(
        task="sst2",
        data_dir=str(glue_dir),
        clients=4,
        rounds=2,
        local_epochs=1.0,
        batch_size=16,
        max_train_examples=400,
    )
    spec = GridSpec(base, (8.0,), ("iid", "dirichlet:0.5"))
    processed = {}
    for cell in spec.cells():
        config = spec.config(cell, tmp_path / cell.name)
        work = get_workload(config)
        assert sum(len(s) for s in work.shards) == 400  # the pooled set is the union of the shards
        processed[cell.name] = sum(work.steps_per_round(k) for k in range(len(work.shards))) * config.batch_size
    central = processed.pop("centralized-eps8-seed0")
    assert central == 25 * 16
    for name, value in processed.items():  # ceil per client: at most one extra batch per client
        assert central <= value <= central + 4 * 16, name


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--epsilons", ""], "epsilon list is empty"),
        (["--epsilons", "1,-3"], "'-3'"),
        (["--partitions", "iid,kmeans"], "unknown partition scheme 'kmeans'"),
        (["--clients", "1"], "at least 2 clients"),
    ],
)
def test_compare_cli_refuses_bad_grids(args: list[str], fragment: str, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "fedtune.cli", "compare", *args, "--out", str(tmp_path / "grid")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert fragment in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "grid").exists()


@pytest.mark.slow
def test_small_dirichlet_shards_train_full_batch_or_get_a_minimum_size(glue_dir: Path) -> None:
    from fedtune.simulations.simulate import check_workload
    from fedtune.workload import get_workload

    base = RunConfig(
        task="sst2",
        data_dir=str(glue_dir),
        clients=8,
        partition="dirichlet:0.5",
        batch_size=64,
        max_train_examples=2000,
        seed=1,
    )
    check_workload(base)  # accepted: clients below the batch size use q = 1
    work = get_workload(base)
    sizes = [len(s) for s in work.shards]
    assert min(sizes) < 64
    for k, n in enumerate(sizes):
        assert work.sampling_rate(k) == pytest.approx(min(1.0, 64 / n))
        assert work.batch_size(k) == min(64, n)
        assert work.steps_per_round(k) == math.ceil(n / (64 * base.rounds))  # one epoch over the rounds
    raised = base.replace(min_shard_size=64)
    check_workload(raised)
    assert min(len(s) for s in get_workload(raised).shards) >= 64


@pytest.mark.slow
def test_a_cell_with_rejected_updates_is_degraded_and_left_out(tmp_path: Path, glue_dir: Path) -> None:
    from fedtune.simulations.compare import cell_row
    from fedtune.simulations.compare_report import format_results_table

    base = RunConfig(
        task="sst2", data_dir=str(glue_dir), clients=2, rounds=1, local_steps=1, batch_size=8, max_train_examples=64
    )
    spec = GridSpec(base, (8.0,), ("iid",))
    central, federated = spec.cells()
    summary = {
        "metric": "accuracy",
        "final_accuracy": 0.6,
        "composed_epsilon": 7.9,
        "seconds": 3.0,
        "clients": [{"epsilon": 7.8, "epsilon_certified": 7.9, "examples": 64, "steps": 2}],
        "rounds": [
            {"round": 0, "accuracy": 0.5, "clients_trained": 0},
            {"round": 1, "accuracy": 0.6, "clients_trained": 1},
        ],
        "rejected_updates": [{"round": 1, "node": 7, "reason": "OutOfMemoryError"}],
    }
    bad = cell_row(federated, spec.config(federated, tmp_path / "f"), summary)
    assert bad["status"] == "degraded" and "1 update(s) rejected" in bad["error"] and "round(s) 1" in bad["error"]
    good = cell_row(
        central,
        spec.config(central, tmp_path / "c"),
        {
            **summary,
            "rejected_updates": [],
            "rounds": [summary["rounds"][0], {**summary["rounds"][1], "clients_trained": 1}],
        },
    )
    assert good["status"] == "ok" and good["examples_processed"] == 2 * 8
    table = format_results_table([good, bad])
    assert "| centralized | 8 |" in table and "| federated iid |" not in table
    assert "DEGRADED (left out of the table and plots): federated-iid-eps8-seed0" in table


def test_centralized_settings_apply_to_the_centralized_cells_only() -> None:
    """Each setting gets its own tuned batch size and learning rate; the examples processed stay matched."""
    from fedtune.simulations.grid import Cell, GridSpec

    base = RunConfig(clients=8, rounds=11, batch_size=256, local_steps=3, learning_rate=2e-3)
    spec = GridSpec(base, (8.0,), ("iid",), (0,), centralized_settings=("batch-size=1024", "learning_rate=0.01"))
    central = spec.config(Cell("centralized", "pooled", 8.0, 0), "/tmp/c")
    federated = spec.config(Cell("federated", "iid", 8.0, 0), "/tmp/f")
    assert (central.batch_size, central.learning_rate, central.clients) == (1024, 0.01, 1)
    assert (federated.batch_size, federated.learning_rate, federated.clients) == (256, 2e-3, 8)
    # 8 clients x 3 steps x 256 examples per round = 6 steps of 1,024
    assert central.local_steps * central.batch_size == 8 * 3 * 256
    assert GridSpec.from_dict(spec.to_dict()) == spec  # grid.json round trip (resume)


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("epsilon=3", "epsilon cannot differ between settings"),
        ("rounds=2", "rounds cannot differ"),
        ("batch_size=many", "batch_size=.many.: expected a value of type int"),
        ("colour=red", "unknown setting 'colour'"),
        ("momentum=2", r"momentum must be a number in \[0, 1\), got 2.0"),
        ("batch_size", "expected KEY=VALUE"),
    ],
)
def test_bad_centralized_settings_are_refused(item: str, message: str) -> None:
    from fedtune.simulations.grid import GridSpec

    with pytest.raises(ValueError, match=message):
        GridSpec(RunConfig(clients=4), (8.0,), ("iid",), centralized_settings=(item,))


def test_a_resumed_non_private_cell_counts_the_examples_of_every_round(tmp_path: Path) -> None:
    """Without a ledger, a cell's steps come from the plan: a resumed run's summary counts only its last process."""
    from fedtune.simulations.compare import cell_row
    from fedtune.workload import local_plan

    base = RunConfig(task="sst2", clients=2, rounds=3, batch_size=8)
    spec = GridSpec(base, (math.inf,), ("iid",))
    cell = spec.cells()[1]
    config = spec.config(cell, tmp_path / "f")
    steps = local_plan(config, 64)[1]
    summary = {
        "metric": "accuracy",
        "final_accuracy": 0.7,
        "composed_epsilon": math.inf,
        "seconds": 3.0,
        # resumed after round 2: the last process trained one round
        "clients": [{"epsilon": math.inf, "epsilon_certified": math.inf, "examples": 64, "steps": steps}] * 2,
        "rounds": [{"round": r, "accuracy": 0.5, "clients_trained": 2 if r else 0} for r in range(4)],
        "rejected_updates": [],
    }
    row = cell_row(cell, config, summary)
    assert row["status"] == "ok" and row["examples_processed"] == 2 * 3 * steps * 8
