"""``fedtune audit``: canaries into client 0's shard, the audit's refusals, and one real end-to-end run."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from fedtune.cli import main
from fedtune.config import RunConfig
from fedtune.simulations.audit import CanarySet, canary_scores, run_audit, unused_examples
from fedtune.workload import CANARY_DIR, Workload, cache_key, get_workload

TINY = ["--clients", "2", "--rounds", "2", "--max-train-examples", "200", "--max-eval-examples", "64"]


def tiny_config(out: Path, glue_dir: Path) -> RunConfig:
    return RunConfig(clients=2, rounds=2, max_train_examples=200, batch_size=16, data_dir=str(glue_dir), out=str(out))


# -- canaries ----------------------------------------------------------------------------------------------
def test_canary_scores_are_centred_per_label() -> None:
    losses = np.array([1.0, 2.0, 3.0, 10.0, 11.0, 12.0, 0.5])
    labels = (0, 0, 0, 1, 1, 1, 0)
    # label 0: median of 1, 2, 3, 0.5 = 1.5; label 1: median 11
    np.testing.assert_allclose(canary_scores(losses, labels), [0.5, -0.5, -1.5, 1.0, 0.0, -1.0, 1.0])


def test_canary_set_refuses_mismatched_lengths() -> None:
    with pytest.raises(ValueError, match="one label, true label and bit per text: got 2 texts, 1 labels"):
        CanarySet("sst2", (("a",), ("b",)), (0,), (1, 0), (True, False), 0)


def test_canaries_join_client_zero_only(tmp_path: Path, glue_dir: Path) -> None:
    config = tiny_config(tmp_path / "run", glue_dir)
    base = Workload.build(cache_key(config))
    pool = unused_examples(config, base.data.train)
    used = {s for s in base.data.train["sentence"]}
    assert len(pool) > 60_000 and not used & set(pool["sentence"][:500])  # no canary is a training sentence
    canaries = CanarySet.draw(pool, "sst2", 60, seed=0)
    assert all(y != t for y, t in zip(canaries.labels, canaries.true_labels))  # a label other than its own
    assert 18 <= sum(canaries.included) <= 42  # Binomial(60, 1/2) within 3 standard deviations
    assert CanarySet.from_dict(json.loads(json.dumps(canaries.to_dict()))) == canaries
    assert CanarySet.draw(pool, "sst2", 60, seed=0) == canaries  # seeded

    folder = canaries.write_training_shard(config.out_dir)
    assert folder == config.out_dir / CANARY_DIR
    assert pq.read_metadata(folder / "train.parquet").num_rows == sum(canaries.included)
    workload = get_workload(config)
    included = sum(canaries.included)
    assert len(workload.shards[0]) == len(base.shards[0]) + included
    assert len(workload.shards[1]) == len(base.shards[1])
    tail = workload.shards[0].select(range(len(base.shards[0]), len(workload.shards[0])))
    kept = [i for i, b in enumerate(canaries.included) if b]
    assert tail["sentence"] == [canaries.texts[i][0] for i in kept]
    assert tail["label"] == [canaries.labels[i] for i in kept]  # trained on the canary label
    assert workload.sampling_rate(0) == pytest.approx(16 / (len(base.shards[0]) + included))


# -- refusals ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--canaries", "1"], "canaries must be an integer >= 2, got '1'"),
        (["--canaries", "many"], "canaries must be an integer >= 2, got 'many'"),
        (["--confidence", "1.5"], r"confidence must be in (0, 1), got '1.5'"),
        (["--confidence", "0"], r"confidence must be in (0, 1), got '0'"),
    ],
)
def test_cli_refuses_bad_values(option: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["audit", *option])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_refuses_too_many_canaries_before_training(
    tmp_path: Path, glue_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    code = main(["audit", "--data-dir", str(glue_dir), "--max-train-examples", "67000", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("fedtune: error: --canaries 1000 needs more than 1000 training examples the run does not use")
    assert "lower --max-train-examples or --canaries" in err and len(err.strip().splitlines()) == 1
    assert not (out / "checkpoint").exists() and not (out / CANARY_DIR).exists()


def test_refuses_to_overwrite_or_resume_nothing(tmp_path: Path, glue_dir: Path) -> None:
    config = tiny_config(tmp_path / "run", glue_dir)
    with pytest.raises(ValueError, match=r"--resume .*: no audit there"):
        run_audit(config, resume=True)
    (config.out_dir / CANARY_DIR).mkdir(parents=True)
    with pytest.raises(ValueError, match="already holds an audit; pass --resume"):
        run_audit(config)
    with pytest.raises(ValueError, match=r"--canaries must be an integer >= 2, got 1"):
        run_audit(config, canaries=1)
    with pytest.raises(ValueError, match=r"--confidence must be in \(0, 1\), got 1.0"):
        run_audit(config, confidence=1.0)


# -- end to end --------------------------------------------------------------------------------------------
def fedtune(*args: str, data: Path, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "FEDTUNE_DATA_DIR": str(data)}
    result = subprocess.run(
        [sys.executable, "-m", "fedtune.cli", *args], capture_output=True, text=True, env=env, timeout=timeout
    )
    if result.returncode != 0:
        raise AssertionError(f"fedtune {' '.join(args)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result


@pytest.mark.slow
def test_audit_end_to_end(tmp_path: Path, glue_dir: Path) -> None:
    out = tmp_path / "audit"
    args = [*TINY, "--epsilon", "8", "--batch-size", "16", "--canaries", "50", "--seed", "3"]
    first = fedtune("audit", *args, "--out", str(out), data=glue_dir)
    assert "empirical epsilon (lower bound, 95% confidence)" in first.stdout
    for name in ("audit.json", "audit.png", "audit/canaries.json", "audit/scores.json", "summary.json", "adapter"):
        assert (out / name).exists(), name
    assert (out / "audit.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    audit = json.loads((out / "audit.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    secrets = CanarySet.from_dict(json.loads((out / "audit" / "canaries.json").read_text()))

    # the included canaries, and only they, were trained on by client 0: its shard grew by their number
    included = sum(secrets.included)
    clients = {c["id"]: c for c in summary["clients"]}
    assert clients["0"]["examples"] == 100 + included and clients["1"]["examples"] == 100
    assert audit["one_run"]["canaries"] == 50 and audit["one_run"]["included"] == included

    # the bound: a lower bound that never exceeds the run's certified epsilon
    assert audit["confidence"] == 0.95 and audit["delta"] == 1e-5
    assert audit["certified_epsilon"] == pytest.approx(clients["0"]["epsilon_certified"])
    assert 7.9 < audit["certified_epsilon"] <= 8.0 + 1e-6
    assert 0.0 <= audit["empirical_epsilon"] <= audit["certified_epsilon"]
    assert audit["within_certified"] is True
    assert audit["leakage_detected"] is (audit["empirical_epsilon"] > 0)
    one = audit["one_run"]
    assert one["guesses"] == one["k_pos"] + one["k_neg"] and 0 <= one["correct"] <= one["guesses"] <= 50
    assert [list(p) for p in one["candidates"]] == [[1, 1], [2, 2], [5, 5], [12, 12], [25, 25]]
    mia = audit["membership_inference"]
    assert mia["members"] == mia["non_members"] == 100
    assert 0.0 <= mia["auc"] <= 1.0 and 0.0 <= mia["tpr_at_fpr"] <= 1.0 and mia["fpr"] == 0.01
    scores = json.loads((out / "audit" / "scores.json").read_text())
    assert scores["included"] == list(secrets.included) and len(scores["canary_loss"]) == 50
    assert all(math.isfinite(x) and x > 0 for x in scores["canary_loss"])

    # resuming a finished audit scores the same model again: the same numbers, no training
    again = fedtune("audit", "--resume", str(out), data=glue_dir)
    assert "scoring it again" in again.stderr
    rescored = json.loads((out / "audit.json").read_text())
    assert rescored["empirical_epsilon"] == pytest.approx(audit["empirical_epsilon"], abs=1e-9)
    assert rescored["membership_inference"]["auc"] == pytest.approx(mia["auc"], abs=1e-9)
    assert json.loads((out / "summary.json").read_text())["seconds"] == summary["seconds"]  # not trained again
