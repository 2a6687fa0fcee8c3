"""Stateful clients: the optimizer state (momentum, Adam moments, step count) kept in the client's own
state folder from round to round (fedtune.client.optimizer_state, train_local(optimizer_state=...),
run_job with RunConfig.stateful_clients), on the real all-MiniLM-L6-v2 and SST-2."""

from __future__ import annotations

import copy
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import ConfigRecord, Message, RecordDict
from torch import nn

import fedtune.train as train_module
from fedtune.client.job import train_round
from fedtune.client.optimizer_state import FORMAT, OptimizerStateStore
from fedtune.client.privacy import ClientPrivacy, Plan
from fedtune.config import RunConfig
from fedtune.model import LoraSettings, build_peft_model, load_model_and_tokenizer
from fedtune.privacy.ledger import PrivacyLedger
from fedtune.protocol import PRIVACY_KEY
from fedtune.train import OptimizerStateError, TrainConfig, load_optimizer_state, train_local

CPU = torch.device("cpu")
RUN = RunConfig(
    task="sst2",
    clients=2,
    rounds=3,
    epsilon=8.0,
    local_steps=2,
    batch_size=8,
    max_train_examples=80,
    max_eval_examples=8,
    max_length=32,
    seed=3,
    optimizer="adamw",
    stateful_clients=True,
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _steps(state: dict[str, Any]) -> set[float]:
    return {float(s["step"]) for s in state["state"].values()}


# ---------------------------------------------------------------- the store


def _adamw_state() -> dict[str, Any]:
    params = [nn.Parameter(torch.arange(6.0).reshape(2, 3)), nn.Parameter(torch.ones(4))]
    opt = torch.optim.AdamW(params, lr=0.1)
    for p in params:
        p.grad = torch.full_like(p, 0.5)
    opt.step()
    return {**opt.state_dict(), "fedtune_optimizer": "adamw"}


def test_store_round_trip_is_atomic(tmp_path: Path) -> None:
    store = OptimizerStateStore(tmp_path / "client-0")
    assert store.load() is None  # never trained
    state = _adamw_state()
    store.save(3, state)
    assert sorted(p.name for p in store.path.parent.iterdir()) == ["optimizer.pt"]  # no temporary left behind
    server_round, loaded = store.load()  # type: ignore[misc]
    assert server_round == 3 and loaded["fedtune_optimizer"] == "adamw"
    assert loaded["param_groups"] == state["param_groups"]
    for i, entry in state["state"].items():
        assert set(loaded["state"][i]) == set(entry)
        assert all(torch.equal(loaded["state"][i][k], v) for k, v in entry.items())
    store.save(4, {**state, "fedtune_optimizer": "adamw"})
    assert store.load()[0] == 4  # type: ignore[index]  # replaced


@pytest.mark.parametrize(
    ("content", "pattern"),
    [
        (b"not a torch file", r"cannot read the optimizer state .*optimizer\.pt"),
        (b"", r"cannot read the optimizer state"),
        (
            {"format": "other.format/1", "round": 1, "state": {}},
            r"not a fedtune optimizer state \(format 'other.format/1'",
        ),
        ([1, 2, 3], r"not a fedtune optimizer state \(format 'list'"),
        ({"format": FORMAT, "state": {}}, r"damaged fedtune optimizer state: round None"),
        ({"format": FORMAT, "round": 2, "state": [1]}, r"damaged fedtune optimizer state: round 2, state of type list"),
    ],
)
def test_store_refuses_a_corrupt_or_foreign_file(tmp_path: Path, content: Any, pattern: str) -> None:
    store = OptimizerStateStore(tmp_path)
    if isinstance(content, bytes):
        store.path.write_bytes(content)
    else:
        torch.save(content, store.path)
    with pytest.raises(ValueError, match=pattern):
        store.load()
    assert store.path.exists()  # left in place for the operator


def test_store_refuses_a_pickled_object(tmp_path: Path) -> None:
    """weights_only loading: a file that would run code is refused, not executed."""
    store = OptimizerStateStore(tmp_path)
    torch.save({"format": FORMAT, "round": 1, "state": {"x": Path("p")}}, store.path)
    with pytest.raises(ValueError, match="cannot read the optimizer state"):
        store.load()


# ---------------------------------------------------------------- train_local continues a state


@pytest.fixture(scope="module")
def tiny(glue_dir: Path) -> dict[str, Any]:
    from fedtune.batching import pack_dataset
    from fedtune.data.glue import load_glue
    from fedtune.data.tokenize import tokenize_dataset

    base, tokenizer = load_model_and_tokenizer(None, 2, seed=0)
    for module in base.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    data = load_glue("sst2", glue_dir, seed=0, max_train_examples=40, max_eval_examples=8)
    return {
        "base": base,
        "model": build_peft_model(copy.deepcopy(base), LoraSettings(rank=4), seed=0),
        "train": pack_dataset(tokenize_dataset(data.train, tokenizer, data.spec, max_length=32), tokenizer),
    }


@pytest.mark.parametrize(
    ("optimizer", "noise"),
    [("adamw", None), ("adambc", 1.0)],
)
def test_train_local_continues_adam_state(tiny: dict[str, Any], optimizer: str, noise: float | None) -> None:
    config = TrainConfig(
        batch_size=8, steps=2, optimizer=optimizer, noise_multiplier=noise, seed=1, dp_randomness="seeded"
    )
    first = train_local(tiny["model"], tiny["train"], None, config, CPU)
    assert first.optimizer_state is not None and _steps(first.optimizer_state) == {2.0}
    second = train_local(tiny["model"], tiny["train"], None, config, CPU, optimizer_state=first.optimizer_state)
    assert second.optimizer_state is not None and _steps(second.optimizer_state) == {4.0}
    fresh = train_local(tiny["model"], tiny["train"], None, config, CPU)
    # the carried moments change the update (same seed, same batches, same noise)
    assert any(not torch.equal(second.state[k], fresh.state[k]) for k in fresh.state)
    # the caller's state is not modified by continuing it
    assert _steps(first.optimizer_state) == {2.0}


def test_train_local_carries_sgd_momentum(tiny: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """The first step of the continued run is p -= lr * (mu * saved_buffer + g): the buffer is carried."""
    lr, mu = 0.05, 0.9
    config = TrainConfig(batch_size=8, steps=2, optimizer="sgd", momentum=mu, learning_rate=lr, seed=1)
    first = train_local(tiny["model"], tiny["train"], None, config, CPU)
    assert first.optimizer_state is not None
    saved = [first.optimizer_state["state"][i]["momentum_buffer"] for i in sorted(first.optimizer_state["state"])]

    seen: list[dict[str, Any]] = []
    original = train_module.make_optimizer

    def recording(params: Any, cfg: TrainConfig) -> torch.optim.Optimizer:
        opt = original(params, cfg)

        def before(o: torch.optim.Optimizer, *_: Any) -> None:
            if not seen:
                ps = [p for g in o.param_groups for p in g["params"]]
                seen.append({"ps": ps, "old": [p.detach().clone() for p in ps], "g": [p.grad.clone() for p in ps]})  # type: ignore[union-attr]

        def after(o: torch.optim.Optimizer, *_: Any) -> None:
            if "new" not in seen[0]:
                seen[0]["new"] = [p.detach().clone() for p in seen[0]["ps"]]

        opt.register_step_pre_hook(before)
        opt.register_step_post_hook(after)
        return opt

    monkeypatch.setattr(train_module, "make_optimizer", recording)
    train_local(tiny["model"], tiny["train"], None, config, CPU, optimizer_state=first.optimizer_state)
    record = seen[0]
    assert len(saved) == len(record["ps"])
    for buf, old, g, new in zip(saved, record["old"], record["g"], record["new"], strict=True):
        torch.testing.assert_close(new, old - lr * (mu * buf + g), rtol=0, atol=1e-6)
    assert max(float(b.abs().max()) for b in saved) > 1e-3  # the buffer term is not negligible


def test_a_foreign_state_is_refused(tiny: dict[str, Any]) -> None:
    config = TrainConfig(batch_size=8, steps=1, optimizer="adamw", seed=1)
    adamw = train_local(tiny["model"], tiny["train"], None, config, CPU).optimizer_state
    assert adamw is not None
    sgd = TrainConfig(batch_size=8, steps=1, optimizer="sgd", seed=1)
    with pytest.raises(OptimizerStateError, match=r"saved optimizer state is 'adamw', this run's optimizer is 'sgd'"):
        train_local(tiny["model"], tiny["train"], None, sgd, CPU, optimizer_state=adamw)
    # another set of parameters: FFA-LoRA has fewer trainable tensors
    ffa = build_peft_model(copy.deepcopy(tiny["base"]), LoraSettings(rank=4, ffa=True), seed=0)
    with pytest.raises(ValueError, match=r"parameter groups of sizes \[\d+\], this model's are \[\d+\]"):
        train_local(ffa, tiny["train"], None, config, CPU, optimizer_state=adamw)
    # same number of tensors, other shapes (another LoRA rank): torch alone would load it and fail mid-step
    rank8 = build_peft_model(copy.deepcopy(tiny["base"]), LoraSettings(rank=8), seed=0)
    with pytest.raises(ValueError, match=r"'exp_avg' of parameter 0 has shape \(4, 384\).*\(8, 384\)"):
        train_local(rank8, tiny["train"], None, config, CPU, optimizer_state=adamw)
    # not an optimizer state at all
    with pytest.raises(ValueError, match="not a torch optimizer state_dict"):
        train_local(tiny["model"], tiny["train"], None, config, CPU, optimizer_state={"weights": 1})


def test_load_optimizer_state_keeps_this_runs_hyper_parameters() -> None:
    p = nn.Parameter(torch.zeros(3))
    old = torch.optim.SGD([p], lr=1.0, momentum=0.5)
    p.grad = torch.ones(3)
    old.step()
    state = {**old.state_dict(), "fedtune_optimizer": "sgd"}
    q = nn.Parameter(torch.zeros(3))
    new = torch.optim.SGD([q], lr=0.01, momentum=0.9)
    load_optimizer_state(new, state, TrainConfig(optimizer="sgd"))
    assert (new.param_groups[0]["lr"], new.param_groups[0]["momentum"]) == (0.01, 0.9)
    torch.testing.assert_close(new.state[q]["momentum_buffer"], torch.ones(3))


# ---------------------------------------------------------------- a client's rounds (run_job)


@pytest.fixture(autouse=True)
def _task_identity(flower_task_identity: None) -> None:
    """Messages built here need Flower's task identity (see tests/conftest.py)."""


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory, glue_dir: Path) -> dict[str, Any]:
    """The global model of RUN and client 0's calibration (computed once: it is the slow part)."""
    from fedtune.model import get_trainable_state
    from fedtune.protocol import to_record
    from fedtune.workload import get_workload

    workload = get_workload(RUN.replace(data_dir=str(glue_dir)))
    calibrated = tmp_path_factory.mktemp("calibrated")
    plan = Plan(workload.sampling_rate(0), workload.steps_per_round(0), RUN.rounds)
    ClientPrivacy("0", calibrated, RUN.epsilon, RUN.delta, RUN.accountant).calibrate(plan)
    return {
        "arrays": to_record(get_trainable_state(workload.new_model())),
        "calibration": calibrated / "calibration.json",
        "steps": workload.steps_per_round(0),
    }


def _client_folder(federation: dict[str, Any], path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    shutil.copy(federation["calibration"], path / "calibration.json")
    return path


def _round(federation: dict[str, Any], config: RunConfig, state: Path, server_round: int, glue_dir: Path) -> Any:
    message = Message(
        RecordDict({"arrays": federation["arrays"], "config": ConfigRecord({"server-round": server_round})}),
        dst_node_id=0,
        message_type="train",
    )
    reply = train_round(message, config.replace(data_dir=str(glue_dir)), 0, state)
    return dict(reply.content.config_records[PRIVACY_KEY])


def test_a_stateful_client_continues_its_optimizer_across_rounds(
    federation: dict[str, Any], tmp_path: Path, glue_dir: Path
) -> None:
    state = _client_folder(federation, tmp_path / "client-0")
    steps = federation["steps"]
    store = OptimizerStateStore(state)
    assert _round(federation, RUN, state, 1, glue_dir)["status"] == "ok"
    saved = store.load()
    assert saved is not None and saved[0] == 1 and _steps(saved[1]) == {float(steps)}
    assert saved[1]["fedtune_optimizer"] == "adamw"
    assert PrivacyLedger.load(state / "ledger.json").rounds("0") == [1]
    # round 2, by fresh job objects (train_round builds a new ClientJob and ClientPrivacy, as a new
    # process would): the state comes from the folder alone
    assert _round(federation, RUN, state, 2, glue_dir)["status"] == "ok"
    saved = store.load()
    assert saved is not None and saved[0] == 2 and _steps(saved[1]) == {2.0 * steps}
    # a round asked again is re-sent from the ledger, without training: the state does not move
    again = _round(federation, RUN, state, 2, glue_dir)
    assert again["resent"] is True and store.load()[0] == 2  # type: ignore[index]
    assert _steps(store.load()[1]) == {2.0 * steps}  # type: ignore[index]
    # without the file the client starts afresh
    store.path.unlink()
    assert _round(federation, RUN, state, 3, glue_dir)["status"] == "ok"
    assert _steps(store.load()[1]) == {float(steps)}  # type: ignore[index]


def test_a_stateless_client_saves_nothing(federation: dict[str, Any], tmp_path: Path, glue_dir: Path) -> None:
    state = _client_folder(federation, tmp_path / "client-0")
    assert _round(federation, RUN.replace(stateful_clients=False), state, 1, glue_dir)["status"] == "ok"
    assert not (state / "optimizer.pt").exists() and (state / "ledger.json").exists()


def test_the_state_is_saved_only_after_the_spend_is_recorded(
    federation: dict[str, Any], tmp_path: Path, glue_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crash before the ledger records a round must not leave that round's (privatized) gradients
    in the optimizer state: the round would be trained again and its first run leak, uncounted, into
    later updates."""
    state = _client_folder(federation, tmp_path / "client-0")

    def crash(*_: Any, **__: Any) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(ClientPrivacy, "record", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        _round(federation, RUN, state, 1, glue_dir)
    assert not (state / "optimizer.pt").exists()


def test_a_damaged_or_foreign_state_file_is_a_refusal(
    federation: dict[str, Any], tmp_path: Path, glue_dir: Path
) -> None:
    state = _client_folder(federation, tmp_path / "client-0")
    (state / "optimizer.pt").write_bytes(b"garbage")
    reply = _round(federation, RUN, state, 1, glue_dir)
    assert reply["status"] == "refused" and "cannot read the optimizer state" in reply["reason"]
    assert "remove the file to start afresh" in reply["reason"]
    # a state of another optimizer (the run switched from adamw to sgd): refused before any step
    OptimizerStateStore(state).save(1, _adamw_state())
    reply = _round(federation, RUN.replace(optimizer="sgd"), state, 2, glue_dir)
    assert reply["status"] == "refused" and "'adamw', this run's optimizer is 'sgd'" in reply["reason"]
    assert not PrivacyLedger.open(state / "ledger.json", RUN.delta).rounds("0")  # nothing spent
    assert math.isfinite(float(reply["noise-multiplier"]))


def test_a_round_trained_again_continues_from_the_state_before_it(tmp_path):
    """A resumed run that re-trains round r must not feed round r's first attempt into the optimizer."""
    import torch

    store = OptimizerStateStore(tmp_path)
    states = {r: {"state": {0: {"step": torch.tensor(float(r))}}, "param_groups": [{"params": [0]}]} for r in (1, 2)}
    store.save(1, states[1])
    store.save(2, states[2])
    assert store.load(before_round=3)[0] == 2
    assert store.load(before_round=2)[0] == 1  # round 2 again: start from round 1's state
    store.save(2, states[2])  # its second attempt replaces the first, round 1 stays the previous
    assert store.load(before_round=2)[0] == 1
    assert store.load()[0] == 2
    assert store.load(before_round=1) is None
