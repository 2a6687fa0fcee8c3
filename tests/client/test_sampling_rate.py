"""A shared sampling rate (RunConfig.sampling_rate) reaches a real client's round: its expected batch
is q N_k, its learning rate follows that batch, and the round's privacy record and ledger carry the
rate the client actually trained with (the real all-MiniLM-L6-v2 on an SST-2 slice)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from flwr.app import ConfigRecord, Message, RecordDict

import fedtune.client.job as job_module
import fedtune.train as train_module
from fedtune.config import RunConfig
from fedtune.privacy.ledger import PrivacyLedger
from fedtune.protocol import PRIVACY_KEY

pytestmark = pytest.mark.usefixtures("one_torch_thread", "flower_task_identity")

RUN = RunConfig(
    task="sst2",
    clients=2,
    partition="dirichlet:0.5",
    rounds=2,
    epsilon=8.0,
    sampling_rate=0.1,
    max_train_examples=200,
    max_eval_examples=8,
    max_length=32,
    seed=5,
)


def test_each_client_trains_with_its_own_batch_at_the_shared_rate(
    tmp_path: Path, glue_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedtune.model import get_trainable_state
    from fedtune.protocol import to_record
    from fedtune.workload import get_workload

    config = RUN.replace(data_dir=str(glue_dir), out=str(tmp_path / "run"))
    workload = get_workload(config)
    sizes = [len(s) for s in workload.shards]
    assert sizes[0] != sizes[1]  # a skewed split: the clients' batches differ
    seen: list[Any] = []
    real = train_module.train_local

    def spy(model: Any, shard: Any, collator: Any, train_config: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append(train_config)
        return real(model, shard, collator, train_config, *args, **kwargs)

    monkeypatch.setattr(train_module, "train_local", spy)  # run_job imports it when it runs
    arrays = to_record(get_trainable_state(workload.new_model()))
    for client in (0, 1):
        state = tmp_path / f"client-{client}"
        message = Message(
            RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1})}),
            dst_node_id=0,
            message_type="train",
        )
        reply = job_module.train_round(message, config, client, state)
        record = dict(reply.content.config_records[PRIVACY_KEY])
        batch = round(0.1 * sizes[client])
        assert record["status"] == "ok"
        assert seen[-1].batch_size == batch
        assert seen[-1].learning_rate == pytest.approx(min(10.24 / batch, 0.04))
        assert record["sampling-rate"] == pytest.approx(batch / sizes[client])  # what the sampler used
        assert record["steps"] == 5  # ceil(1 / (0.1 * 2)): the same for every client
        (entry,) = PrivacyLedger.load(state / "ledger.json").to_dict()["entries"]  # type: ignore[misc]
        assert entry["sampling_rate"] == pytest.approx(batch / sizes[client]) and entry["steps"] == 5
