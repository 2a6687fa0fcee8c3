"""LedgerStrategy: FedAvg's weighted mean, ledger recording, rejection of bad updates, budget exclusion."""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity

from fedtune.privacy.events import SubsampledGaussianEvent
from fedtune.privacy.ledger import PrivacyLedger
from fedtune.protocol import PRIVACY_KEY
from fedtune.server.strategy import LedgerStrategy
from fedtune.server.validation import InvalidUpdate, validate_update


@pytest.fixture(autouse=True)
def _task_identity(flower_task_identity: None) -> None:
    """Messages built here need Flower's task identity (see tests/conftest.py)."""


REFERENCE = ArrayRecord(
    {"lora_A": Array(np.zeros((2, 3), dtype=np.float32)), "head": Array(np.zeros(4, dtype=np.float32))}
)


def reply(
    node: int,
    arrays: dict[str, np.ndarray],
    examples: int,
    *,
    client: str | None = None,
    status: str = "ok",
    event: SubsampledGaussianEvent = SubsampledGaussianEvent(0.1, 1.0, 10),
    release: float = 0.0,
) -> Message:
    """A train reply from ``node`` as a ClientApp would send it."""
    TaskIdentity.node_id = 0
    request = Message(RecordDict({"arrays": REFERENCE}), dst_node_id=node, message_type="train")
    TaskIdentity.node_id = node
    privacy = ConfigRecord(
        {
            "client-id": client or str(node),
            "status": status,
            "sampling-rate": event.sampling_rate,
            "noise-multiplier": event.noise_multiplier,
            "steps": event.steps,
            "examples": examples,
            **({"release-noise-multiplier": release} if release else {}),
        }
    )
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
            "metrics": MetricRecord({"num-examples": examples}),
            PRIVACY_KEY: privacy,
        }
    )
    return Message(content, reply_to=request)


def arrays(value: float) -> dict[str, np.ndarray]:
    return {"lora_A": np.full((2, 3), value, dtype=np.float32), "head": np.full(4, value, dtype=np.float32)}


def make_strategy(budget: float = math.inf) -> LedgerStrategy:
    strategy = LedgerStrategy(FedAvg(fraction_evaluate=0.0), PrivacyLedger(None, 1e-5, budget))
    strategy._reference = REFERENCE
    return strategy


def test_fedavg_is_the_weighted_mean_and_events_are_recorded() -> None:
    strategy = make_strategy()
    rng = np.random.default_rng(0)
    a = {"lora_A": rng.normal(size=(2, 3)).astype(np.float32), "head": rng.normal(size=4).astype(np.float32)}
    b = {"lora_A": rng.normal(size=(2, 3)).astype(np.float32), "head": rng.normal(size=4).astype(np.float32)}
    agg, _ = strategy.aggregate_train(1, [reply(1, a, 100), reply(2, b, 300)])
    assert agg is not None
    for key in a:
        expected = (100 * a[key] + 300 * b[key]) / 400
        np.testing.assert_allclose(agg[key].numpy(), expected, rtol=1e-6, atol=1e-7)
    assert strategy.ledger.clients == ["1", "2"]
    assert strategy.ledger.composition("1").steps == 10


@pytest.mark.parametrize(
    "bad, reason",
    [
        ({"lora_A": np.zeros((2, 3), np.float32)}, "missing"),
        ({**arrays(0.0), "extra": np.zeros(1, np.float32)}, "unexpected"),
        ({"lora_A": np.zeros((3, 2), np.float32), "head": np.zeros(4, np.float32)}, "shape"),
        ({"lora_A": np.full((2, 3), np.nan, np.float32), "head": np.zeros(4, np.float32)}, "non-finite"),
    ],
)
def test_bad_updates_are_rejected_and_the_round_goes_on(bad: dict[str, np.ndarray], reason: str) -> None:
    strategy = make_strategy()
    agg, _ = strategy.aggregate_train(1, [reply(1, arrays(1.0), 50), reply(2, bad, 50)])
    assert agg is not None
    np.testing.assert_allclose(agg["head"].numpy(), 1.0)  # only the good update counts
    assert strategy.ledger.clients == ["1"]  # the rejected client's event is not recorded by the server
    assert len(strategy.rejected) == 1 and reason in str(strategy.rejected[0]["reason"])


def test_validate_update_names_the_key() -> None:
    with pytest.raises(InvalidUpdate, match="'head'"):
        validate_update(
            ArrayRecord({"lora_A": Array(np.zeros((2, 3), np.float32)), "head": Array(np.zeros(5, np.float32))}),
            REFERENCE,
        )


def test_refusal_is_not_aggregated_and_the_client_is_left_out() -> None:
    strategy = make_strategy()
    agg, _ = strategy.aggregate_train(1, [reply(1, arrays(2.0), 10, status="refused")])
    assert agg is None
    assert "1" in strategy.refused
    assert not strategy.can_train(1)


def test_client_out_of_budget_is_left_out() -> None:
    event = SubsampledGaussianEvent(0.2, 0.8, 50)
    probe = make_strategy()
    probe.aggregate_train(1, [reply(1, arrays(1.0), 10, event=event)])
    spent = probe.ledger.certified_epsilon("1")
    after = probe.ledger.check("1", event).epsilon_after
    for budget, allowed in (((spent + after) / 2, False), (after * 1.01, True)):
        strategy = make_strategy(budget=budget)
        strategy.aggregate_train(1, [reply(1, arrays(1.0), 10, event=event)])
        assert strategy.can_train(1) is allowed
    assert strategy.can_train(99)  # unseen clients check their own budget


def test_duplicate_reply_counts_once() -> None:
    strategy = make_strategy()
    strategy.aggregate_train(3, [reply(1, arrays(1.0), 10)])
    strategy.aggregate_train(3, [reply(1, arrays(1.0), 10)])
    assert len(strategy.ledger) == 1


def test_two_nodes_claiming_one_client_id_are_rejected_not_a_crash() -> None:
    strategy = make_strategy(budget=50.0)
    other = SubsampledGaussianEvent(0.2, 1.0, 10)  # a different event for the same (client, round)
    agg, _ = strategy.aggregate_train(
        1, [reply(1, arrays(1.0), 100, client="alice"), reply(2, arrays(3.0), 100, client="alice", event=other)]
    )
    assert agg is not None
    np.testing.assert_allclose(agg["head"].numpy(), 1.0)  # only the first, recorded update is averaged
    assert strategy.ledger.composition("alice").steps == 10
    assert len(strategy.rejected) == 1 and "alice" in str(strategy.rejected[0]["reason"])


def test_a_non_private_update_is_rejected_in_a_private_run() -> None:
    strategy = make_strategy(budget=8.0)
    message = reply(1, arrays(1.0), 100)
    message.content[PRIVACY_KEY]["dp"] = False
    agg, _ = strategy.aggregate_train(1, [message, reply(2, arrays(2.0), 100)])
    assert agg is not None
    np.testing.assert_allclose(agg["head"].numpy(), 2.0)
    assert "non-private update in a private run" in str(strategy.rejected[0]["reason"])
    assert strategy.ledger.clients == ["2"]


def test_a_label_count_release_is_recorded_once_as_round_0_and_composed() -> None:
    """Logit adjustment under DP: every reply names the client's one-off release; the server records it as
    round 0 once, and the client's certified epsilon composes it with its rounds."""
    from fedtune.privacy.calibration import certifier
    from fedtune.privacy.events import Composition
    from fedtune.privacy.ledger import RELEASE_ROUND

    strategy = make_strategy(budget=8.0)
    for server_round in (1, 2):
        strategy.aggregate_train(server_round, [reply(1, arrays(1.0), 100, release=20.0), reply(2, arrays(2.0), 100)])
    assert strategy.ledger.rounds("1") == [RELEASE_ROUND, 1, 2] and strategy.ledger.rounds("2") == [1, 2]
    assert [e.kind for e in strategy.ledger if e.client_id == "1"] == ["release", "train", "train"]
    assert [(r["rounds"], r["steps"], r["releases"]) for r in strategy.ledger.report()] == [(2, 20, 1), (2, 20, 0)]
    release, event = SubsampledGaussianEvent(1.0, 20.0, 1), SubsampledGaussianEvent(0.1, 1.0, 10)
    expected = certifier().get_epsilon(Composition((release, event, event)), 1e-5)
    assert strategy.ledger.certified_epsilon("1") == pytest.approx(expected, rel=1e-9)
    assert strategy.ledger.certified_epsilon("1") > strategy.ledger.certified_epsilon("2")
    # a reply claiming another release for the same client is rejected, not recorded
    agg, _ = strategy.aggregate_train(3, [reply(1, arrays(1.0), 100, release=5.0)])
    assert agg is None and "already recorded" in str(strategy.rejected[-1]["reason"])
    # a malformed release is rejected with the value named
    agg, _ = strategy.aggregate_train(3, [reply(2, arrays(1.0), 100, release=-1.0)])
    assert agg is None and "-1" in str(strategy.rejected[-1]["reason"])
