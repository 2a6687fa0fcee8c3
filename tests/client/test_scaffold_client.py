"""A SCAFFOLD client (RunConfig.scaffold) on the real all-MiniLM-L6-v2 and an SST-2 slice, through run_job:
it refuses a round that carries no global variate, trains with c - c_k, keeps its new variate on disk
after the spend is recorded, sends it with the update, and re-sends it with a round already paid for."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message, RecordDict

import fedtune.client.job as job_module
import fedtune.train as train_module
from fedtune.client.optimizer_state import ControlVariateStore
from fedtune.config import RunConfig
from fedtune.protocol import CONTROL_KEY, PRIVACY_KEY, to_record

pytestmark = pytest.mark.usefixtures("one_torch_thread", "flower_task_identity")

RUN = RunConfig(
    task="sst2",
    clients=2,
    rounds=2,
    epsilon=8.0,
    batch_size=16,
    scaffold=True,
    max_train_examples=120,
    max_eval_examples=8,
    max_length=32,
    seed=2,
)


def _message(arrays: Any, server_round: int, control: dict[str, Any] | None) -> Message:
    content = RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": server_round})})
    if control is not None:
        content[CONTROL_KEY] = to_record(control)
    return Message(content, dst_node_id=0, message_type="train")


def test_a_scaffold_client_round_by_round(tmp_path: Path, glue_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fedtune.model import get_trainable_state
    from fedtune.workload import get_workload

    config = RUN.replace(data_dir=str(glue_dir), out=str(tmp_path / "run"))
    workload = get_workload(config)
    state_dir = tmp_path / "client-0"
    global_state = get_trainable_state(workload.new_model())
    arrays = to_record(global_state)
    corrections: list[Any] = []
    real = train_module.train_local

    def spy(*args: Any, **kwargs: Any) -> Any:
        corrections.append(kwargs.get("gradient_correction"))
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "train_local", spy)

    # no global variate: refused with the reason, nothing trained, nothing spent
    reply = job_module.train_round(_message(arrays, 1, None), config, 0, state_dir)
    record = dict(reply.content.config_records[PRIVACY_KEY])
    assert record["status"] == "refused" and "sent no control variate" in str(record["reason"])
    assert corrections == [] and not (state_dir / "control.pt").exists()

    # round 1: c = 0 and no c_k yet, so the correction is zero; the new c_k is stored and sent
    zeros = {k: np.zeros(v.shape, dtype=np.float32) for k, v in global_state.items()}
    reply = job_module.train_round(_message(arrays, 1, zeros), config, 0, state_dir)
    assert dict(reply.content.config_records[PRIVACY_KEY])["status"] == "ok"
    assert all(float(v.abs().max()) == 0.0 for v in corrections[-1].values())
    sent = {k: reply.content[CONTROL_KEY][k].numpy() for k in global_state}
    stored = ControlVariateStore(state_dir).at(1)
    assert stored is not None and set(stored) == set(global_state)
    assert all(np.array_equal(sent[k], stored[k].numpy()) for k in global_state)
    assert any(float(np.abs(v).max()) > 0 for v in sent.values())  # a mean of noised gradients, never all zero

    # round 2: the correction is exactly c - c_1
    gen = np.random.default_rng(4)
    c = {k: gen.normal(0, 0.01, size=v.shape).astype(np.float32) for k, v in global_state.items()}
    reply = job_module.train_round(_message(arrays, 2, c), config, 0, state_dir)
    assert dict(reply.content.config_records[PRIVACY_KEY])["status"] == "ok"
    for k in global_state:
        torch.testing.assert_close(corrections[-1][k], torch.from_numpy(c[k]) - stored[k])

    # round 2 again (the server lost the reply): the stored update and variate, no new training
    trained = len(corrections)
    again = job_module.train_round(_message(arrays, 2, c), config, 0, state_dir)
    assert len(corrections) == trained
    assert dict(again.content.config_records[PRIVACY_KEY])["resent"] is True
    for k in global_state:
        np.testing.assert_array_equal(again.content[CONTROL_KEY][k].numpy(), reply.content[CONTROL_KEY][k].numpy())

    # a server variate that does not fit the model is refused with the reason
    bad = dict(c)
    bad[next(iter(bad))] = np.zeros(3, dtype=np.float32)
    other = job_module.train_round(_message(arrays, 1, bad), config, 1, tmp_path / "client-1")
    record = dict(other.content.config_records[PRIVACY_KEY])
    assert record["status"] == "refused" and "does not match the model's arrays" in str(record["reason"])
