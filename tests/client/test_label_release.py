"""The private release of a client's label counts for logit adjustment under DP
(ClientPrivacy.release_label_counts, Plan.releases, run_job): the noise actually sampled, one release
recorded as ledger round 0 and never repeated, refusals, the calibration that makes room for it, and a
real DP round whose reply carries the release to the server's ledger."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, RecordDict

from fedtune.client.job import train_round
from fedtune.client.privacy import LABEL_COUNTS_FORMAT, ClientPrivacy, Plan
from fedtune.config import RunConfig
from fedtune.privacy.calibration import certifier
from fedtune.privacy.events import Composition, SubsampledGaussianEvent
from fedtune.privacy.ledger import RELEASE_ROUND, PrivacyLedger
from fedtune.protocol import PRIVACY_KEY, ClientReply

SIGMA_H = 20.0


def test_the_noise_added_to_the_counts_is_the_gaussian_sampled(tmp_path: Path) -> None:
    """4,000 labels, so the noise is measured: N(0, sigma_h^2) per count, the draw of the rng handed in."""
    counts = np.arange(4000, dtype=np.float64)
    guard = ClientPrivacy("0", tmp_path, epsilon=8.0, delta=1e-5)
    released = guard.release_label_counts(counts, SIGMA_H, 10_000, np.random.default_rng(5))
    assert not isinstance(released, str)
    noisy, event = released
    noise = noisy - counts
    np.testing.assert_allclose(noise, np.random.default_rng(5).normal(0.0, SIGMA_H, 4000))
    assert abs(noise.std() / SIGMA_H - 1.0) < 0.05  # sampling error of the std: ~1.1% for 4,000 draws
    assert abs(noise.mean()) < 4 * SIGMA_H / math.sqrt(4000)
    assert event == SubsampledGaussianEvent(1.0, SIGMA_H, 1)


def test_the_release_is_recorded_as_round_0_and_never_repeated(tmp_path: Path) -> None:
    counts = np.array([12898.0, 0.0])
    first = ClientPrivacy("5", tmp_path, epsilon=8.0, delta=1e-5).release_label_counts(
        counts, SIGMA_H, 12898, np.random.default_rng(1)
    )
    assert not isinstance(first, str)
    stored = json.loads((tmp_path / "label_counts.json").read_text())
    assert stored["format"] == LABEL_COUNTS_FORMAT and stored["noise_multiplier"] == SIGMA_H
    np.testing.assert_array_equal(stored["counts"], first[0])
    ledger = PrivacyLedger.load(tmp_path / "ledger.json")
    assert [(e.round, e.kind, e.event, e.examples) for e in ledger] == [(RELEASE_ROUND, "release", first[1], 12898)]
    # a restarted client asking again (other rng, other sigma) reads the release back: no second spend
    again = ClientPrivacy("5", tmp_path, epsilon=8.0, delta=1e-5).release_label_counts(
        counts, 2.0, 12898, np.random.default_rng(99)
    )
    assert not isinstance(again, str)
    np.testing.assert_array_equal(again[0], first[0])
    assert again[1] == first[1] and len(PrivacyLedger.load(tmp_path / "ledger.json")) == 1


def test_a_crash_between_the_file_and_the_ledger_is_recorded_on_the_next_call(tmp_path: Path) -> None:
    (tmp_path / "label_counts.json").write_text(
        json.dumps({"format": LABEL_COUNTS_FORMAT, "noise_multiplier": 3.0, "counts": [10.5, -1.25]})
    )
    guard = ClientPrivacy("2", tmp_path, epsilon=8.0, delta=1e-5)
    released = guard.release_label_counts(np.array([11.0, 0.0]), SIGMA_H, 11, np.random.default_rng(0))
    assert not isinstance(released, str)
    np.testing.assert_array_equal(released[0], [10.5, -1.25])
    assert guard.released_event() == SubsampledGaussianEvent(1.0, 3.0, 1)
    assert [e.kind for e in PrivacyLedger.load(tmp_path / "ledger.json")] == ["release"]


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        ("delete", "is missing; refusing to release them again"),
        ("garble", "unreadable"),
        ("other-format", "unreadable (format 'fedtune.label-counts/0'"),
        ("three-labels", "do not fit this task's 2 labels"),
    ],
)
def test_a_lost_or_damaged_release_is_refused_not_repeated(tmp_path: Path, damage: str, reason: str) -> None:
    guard = ClientPrivacy("3", tmp_path, epsilon=8.0, delta=1e-5)
    assert not isinstance(guard.release_label_counts(np.array([4.0, 6.0]), SIGMA_H, 10, np.random.default_rng()), str)
    path = tmp_path / "label_counts.json"
    if damage == "delete":
        path.unlink()
    elif damage == "garble":
        path.write_text("{not json")
    else:
        stored = json.loads(path.read_text())
        if damage == "other-format":
            stored["format"] = "fedtune.label-counts/0"
        else:
            stored["counts"] = [1.0, 2.0, 3.0]
        path.write_text(json.dumps(stored))
    verdict = ClientPrivacy("3", tmp_path, epsilon=8.0, delta=1e-5).release_label_counts(
        np.array([4.0, 6.0]), SIGMA_H, 10, np.random.default_rng()
    )
    assert isinstance(verdict, str) and reason in verdict
    assert len(PrivacyLedger.load(tmp_path / "ledger.json")) == 1


def test_a_release_past_the_budget_is_refused(tmp_path: Path) -> None:
    guard = ClientPrivacy("4", tmp_path, epsilon=0.05, delta=1e-5)
    verdict = guard.release_label_counts(np.array([4.0, 6.0]), 1.0, 10, np.random.default_rng())
    assert isinstance(verdict, str) and verdict.startswith("releasing the label counts:") and "0.05" in verdict
    assert not (tmp_path / "label_counts.json").exists() and len(guard.ledger) == 0


def test_the_calibration_leaves_room_for_the_release(tmp_path: Path) -> None:
    """The release and every planned round together meet the budget (certified), and a noise multiplier
    calibrated without the release would overspend once the release is counted."""
    release = SubsampledGaussianEvent(1.0, 2.0, 1)  # a costly release, to make the difference plain
    bare = Plan(0.03, 3, 11)
    with_release = Plan(0.03, 3, 11, (release,))
    sigma_bare = ClientPrivacy("0", tmp_path / "a", 3.0, 1e-5).calibrate(bare).sigma
    guard = ClientPrivacy("0", tmp_path / "b", 3.0, 1e-5)
    sigma = guard.calibrate(with_release).sigma
    assert sigma > sigma_bare * 1.02
    reached = certifier().get_epsilon(with_release.composition(sigma), 1e-5)
    assert 3.0 * 0.97 < reached <= 3.0
    assert with_release.composition(sigma) == Composition((release, SubsampledGaussianEvent(0.03, sigma, 33)))
    assert guard.check_noise(with_release, sigma).allowed
    refused = guard.check_noise(with_release, sigma_bare)
    assert not refused.allowed and "with its label-count release" in refused.reason
    key = json.loads((tmp_path / "b" / "calibration.json").read_text())["key"]["plan"]
    assert key["releases"] == [release.to_dict()]


# ------------------------------------------------------------ a real DP round with logit adjustment

RUN = RunConfig(
    task="sst2",
    clients=2,
    rounds=2,
    epsilon=8.0,
    local_steps=2,
    batch_size=8,
    max_train_examples=80,
    max_eval_examples=8,
    max_length=32,
    seed=3,
    logit_adjustment=1.0,
)


@pytest.fixture(autouse=True)
def _task_identity(flower_task_identity: None) -> None:
    """Messages built here need Flower's task identity (see tests/conftest.py)."""


@pytest.mark.usefixtures("one_torch_thread")
def test_a_dp_round_releases_once_and_reports_the_release_to_the_server(tmp_path: Path, glue_dir: Path) -> None:
    from fedtune.model import get_trainable_state
    from fedtune.protocol import to_record
    from fedtune.workload import get_workload

    config = RUN.replace(data_dir=str(glue_dir))
    workload = get_workload(config)
    arrays = to_record(get_trainable_state(workload.new_model()))
    state = tmp_path / "client-0"

    def one_round(server_round: int) -> tuple[Message, dict[str, Any]]:
        message = Message(
            RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": server_round})}),
            dst_node_id=0,
            message_type="train",
        )
        reply = train_round(message, config, 0, state)
        return reply, dict(reply.content.config_records[PRIVACY_KEY])

    _, first = one_round(1)
    _, second = one_round(2)
    for record in (first, second):
        assert record["status"] == "ok" and record["release-noise-multiplier"] == SIGMA_H
    ledger = PrivacyLedger.load(state / "ledger.json")
    assert [(e.round, e.kind) for e in ledger] == [(RELEASE_ROUND, "release"), (1, "train"), (2, "train")]
    assert [(r["rounds"], r["steps"], r["releases"]) for r in ledger.report()] == [(2, 4, 1)]
    assert ledger.rounds("0") == [RELEASE_ROUND, 1, 2]
    release = SubsampledGaussianEvent(1.0, SIGMA_H, 1)
    assert ClientReply.from_config_record(first).release_event == release
    assert next(e.event for e in ledger if e.round == RELEASE_ROUND) == release
    # the client's certified epsilon composes the release with its rounds, and stays within the budget
    events = Composition(tuple(e.event for e in ledger))
    assert second["epsilon-certified"] == pytest.approx(certifier().get_epsilon(events, RUN.delta), rel=1e-9)
    assert second["epsilon-certified"] <= RUN.epsilon
    # the DP-SGD noise was calibrated with the release in the plan
    stored = json.loads((state / "calibration.json").read_text())
    assert stored["key"]["plan"]["releases"] == [release.to_dict()]
    assert first["noise-multiplier"] == stored["calibration"]["sigma"]
    counts = json.loads((state / "label_counts.json").read_text())["counts"]
    assert len(counts) == 2 and abs(sum(counts) - len(workload.packed_train_set(0))) < 6 * SIGMA_H
