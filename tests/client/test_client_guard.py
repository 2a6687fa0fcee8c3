"""A deployed client reviews the server's request and protects its budget: refusals with reasons, never a crash.

The review runs before any training (fast); the last tests train the real model on a tiny shard to show
that a round is recorded before the reply and that asking again re-sends instead of training again.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tomli
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedtune.client.deployed import train_deployed
from fedtune.client.node import NodeSettings
from fedtune.client.policy import review_request
from fedtune.config import RunConfig
from fedtune.data.shards import ShardInfo, write_shards
from fedtune.privacy.ledger import PrivacyLedger
from fedtune.protocol import PRIVACY_KEY, DeployOptions, split_run_config

RUN = RunConfig(task="sst2", clients=2, rounds=2, epsilon=8.0, local_steps=2, batch_size=16, max_length=64, seed=3)
SHARD = ShardInfo(Path("x.parquet"), "sst2", 80, 0, "client-0")


def settings(epsilon: float = 8.0, delta: float = 1e-5) -> NodeSettings:
    return NodeSettings(Path("x"), Path("s"), "client-0", epsilon, delta)


@pytest.mark.parametrize(
    "config, options, node, round_, fragment",
    [
        (RUN, DeployOptions(), settings(), 1, None),
        (RUN, DeployOptions(), settings(), 3, "server-round 3 is not an integer in [1, 2]"),
        (RUN, DeployOptions(), settings(), "1", "server-round '1' is not an integer"),
        (RUN.replace(task="rte"), DeployOptions(), settings(), 1, "task 'rte', but this client's data is task 'sst2'"),
        (RUN.replace(epsilon=math.inf), DeployOptions(), settings(), 1, "asks to train without DP"),
        (RUN, DeployOptions(), settings(epsilon=math.inf), 1, "started without a budget"),
        (RUN, DeployOptions(), settings(delta=0.02), 1, "delta 0.02 is not below 1 / 80"),
    ],
)
def test_review_names_what_it_refuses(
    config: RunConfig, options: DeployOptions, node: NodeSettings, round_: Any, fragment: str | None
) -> None:
    reason = review_request(config, options, node, SHARD, {"server-round": round_})
    assert reason is None if fragment is None else (reason is not None and fragment in reason)


def test_settings_travel_through_a_toml_node_config(tmp_path: Path) -> None:
    node = NodeSettings(tmp_path / 'a "quoted" dir', tmp_path / "state", "alice", math.inf, 1e-6)
    assert NodeSettings.from_node_config(tomli.loads(node.to_toml())) == node
    strict = NodeSettings(tmp_path, tmp_path / "s", "bob", 8.0, 1e-5, "pld", require_secure_aggregation=True)
    assert NodeSettings.from_node_config(tomli.loads(strict.to_toml())) == strict
    with pytest.raises(ValueError, match="lacks data-path"):
        NodeSettings.from_node_config({"state-dir": "s"})


def test_deployment_keys_are_split_from_the_run_config() -> None:
    config, options = split_run_config(
        {**RUN.to_flower(), "min-clients": 1, "noise-multiplier": 2, "deployed": True, "run-key": "r1"}
    )
    assert config == RUN and options == DeployOptions(deployed=True, min_clients=1, noise_multiplier=2.0, run_key="r1")
    with pytest.raises(ValueError, match="run-key must be"):
        split_run_config({"run-key": "a b"})
    with pytest.raises(ValueError, match="unknown run setting"):
        split_run_config({"rounds": 2, "bogus": 1})
    with pytest.raises(ValueError, match="noise-multiplier must be a finite number >= 0"):
        split_run_config({"noise-multiplier": -1.0})


# -- the deployed ClientApp on a real shard ------------------------------------------------------
@pytest.fixture(autouse=True)
def _task_identity(flower_task_identity: None) -> None:
    """Messages built here need Flower's task identity (see tests/conftest.py)."""


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory: pytest.TempPathFactory, glue_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("guard")
    write_shards("sst2", 2, out / "shards", data_dir=str(glue_dir), seed=3, max_train_examples=160)
    return out / "shards" / "client-0"


@pytest.fixture(scope="module")
def global_arrays() -> Any:
    from fedtune.model import get_trainable_state
    from fedtune.protocol import to_record
    from fedtune.workload import build_template

    template, _ = build_template(RUN, 2)
    return to_record(get_trainable_state(template))


def node_config(shard_dir: Path, state: Path, epsilon: float = 8.0, require_secure: bool = False) -> dict[str, Any]:
    node = NodeSettings(shard_dir, state, "client-0", epsilon, 1e-5, require_secure_aggregation=require_secure)
    return dict(tomli.loads(node.to_toml()))


def ask(
    shard_dir: Path,
    state: Path,
    arrays: Any,
    server_round: Any = 1,
    run_config: dict[str, Any] | None = None,
    epsilon: float = 8.0,
    require_secure: bool = False,
    app: Any = None,
) -> Message:
    """Send one train message to the deployed path (through ``app``, a ClientApp, if given), as a SuperNode
    started by `fedtune client` would."""
    message = Message(
        RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": server_round})}),
        dst_node_id=7,
        message_type="train",
    )
    context = Context(
        run_id=1,
        node_id=7,
        node_config=node_config(shard_dir, state, epsilon, require_secure),
        state=RecordDict(),
        run_config={**RUN.to_flower(), **DeployOptions(deployed=True).to_flower(), **(run_config or {})},
    )
    TaskIdentity.node_id = 7
    try:
        return train_deployed(message, context) if app is None else app(message, context)
    finally:
        TaskIdentity.node_id = 0


def privacy(reply: Message) -> dict[str, Any]:
    return dict(reply.content.config_records[PRIVACY_KEY])


def events(state: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (state / "events.jsonl").read_text().splitlines()]


def test_invalid_server_settings_are_refused_not_crashed(shard_dir: Path, tmp_path: Path, global_arrays: Any) -> None:
    reply = ask(shard_dir, tmp_path, global_arrays, run_config={"max-grad-norm": 0.0})
    p = privacy(reply)
    assert (
        p["status"] == "refused" and "max_grad_norm must be in (0, inf)" in p["reason"] and p["client-id"] == "client-0"
    )
    assert not reply.content.array_records and not (tmp_path / "ledger.json").exists()
    assert events(tmp_path)[-1]["decision"] == "refused"


def test_a_client_that_requires_secure_aggregation_refuses_a_plaintext_round(
    shard_dir: Path, tmp_path: Path, global_arrays: Any
) -> None:
    from fedtune.client.app import make_client_app

    reply = ask(shard_dir, tmp_path, global_arrays, require_secure=True, app=make_client_app())
    p = privacy(reply)
    assert p["status"] == "refused" and "requires secure aggregation" in p["reason"]
    assert "--secure-aggregation" in p["reason"]
    assert not reply.content.array_records and not (tmp_path / "ledger.json").exists()  # nothing sent, nothing spent
    assert events(tmp_path)[-1]["decision"] == "refused"


def test_a_secure_round_passes_the_requirement(
    shard_dir: Path, tmp_path: Path, global_arrays: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A message that came through SecAgg+ reaches the deployed path marked secure; the review goes on.

    SecAgg+'s four stages are stood in for (they are tested in tests/server/test_secure_aggregation.py):
    the stand-in hands the message to fedtune's handler as ``secaggplus_mod`` does at its masking stage.
    The server's settings are invalid here, so the round is refused for that reason, not for security.
    """
    import fedtune.client.app as client_app

    seen: list[bool] = []

    def through_secagg(message: Message, context: Context, handler: Any) -> Message:
        seen.append(True)
        return handler(message, context)

    monkeypatch.setattr(client_app, "is_secure_message", lambda message: True)
    monkeypatch.setattr(client_app, "secure_train", through_secagg)
    reply = ask(
        shard_dir,
        tmp_path,
        global_arrays,
        run_config={"max-grad-norm": 0.0},
        require_secure=True,
        app=client_app.make_client_app(),
    )
    p = privacy(reply)
    assert seen == [True]
    assert p["status"] == "refused" and "max_grad_norm must be in (0, inf)" in p["reason"]
    assert "secure aggregation" not in p["reason"]


@pytest.mark.slow
def test_a_noise_multiplier_that_breaks_the_budget_is_refused(
    shard_dir: Path, tmp_path: Path, global_arrays: Any
) -> None:
    reply = ask(shard_dir, tmp_path, global_arrays, run_config={"noise-multiplier": 0.3})
    p = privacy(reply)
    assert (
        p["status"] == "refused" and "noise multiplier 0.3" in p["reason"] and "> this client's budget 8" in p["reason"]
    )
    assert not PrivacyLedger.open(tmp_path / "ledger.json", 1e-5).rounds("client-0")  # nothing spent


@pytest.mark.slow
def test_a_malformed_global_model_is_refused(shard_dir: Path, tmp_path: Path, global_arrays: Any) -> None:
    from flwr.app import Array, ArrayRecord

    key = next(iter(global_arrays.keys()))
    bad = ArrayRecord(
        {
            k: Array(np.full(global_arrays[k].shape, np.nan, np.float32) if k == key else global_arrays[k].numpy())
            for k in global_arrays.keys()
        }
    )
    p = privacy(ask(shard_dir, tmp_path, bad))
    assert (
        p["status"] == "refused"
        and "global model sent for round 1 is unusable" in p["reason"]
        and "non-finite" in p["reason"]
    )


@pytest.mark.slow
def test_spend_is_recorded_before_the_reply_and_a_repeat_is_resent(
    shard_dir: Path, tmp_path: Path, global_arrays: Any
) -> None:
    first = ask(shard_dir, tmp_path, global_arrays, run_config={"run-key": "run-a"})
    p = privacy(first)
    assert p["status"] == "ok" and p["client-id"] == "client-0" and 0 < p["epsilon-certified"] <= 8.0
    ledger = PrivacyLedger.load(tmp_path / "ledger.json")
    assert ledger.rounds("client-0") == [1] and (tmp_path / "updates" / "round-1.npz").exists()
    again = ask(
        shard_dir, tmp_path, global_arrays, run_config={"run-key": "run-a"}
    )  # e.g. a restarted server asks round 1 again
    assert privacy(again)["resent"] is True and privacy(again)["noise-multiplier"] == p["noise-multiplier"]
    for key in first.content["arrays"].keys():
        np.testing.assert_array_equal(first.content["arrays"][key].numpy(), again.content["arrays"][key].numpy())
    assert PrivacyLedger.load(tmp_path / "ledger.json").to_dict() == ledger.to_dict()  # nothing counted twice
    assert [e["decision"] for e in events(tmp_path)] == ["trained", "resent"]
    other = privacy(ask(shard_dir, tmp_path, global_arrays, run_config={"run-key": "run-b"}))  # another federated run
    assert other["status"] == "refused" and "belongs to federated run run-a, not run-b" in other["reason"]
