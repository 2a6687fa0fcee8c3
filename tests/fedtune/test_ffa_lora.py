"""FFA-LoRA (LoraSettings(ffa=True), RunConfig.ffa_lora): every LoRA A frozen at its seeded init and
shared by all clients, only B and the head train, also under Opacus DP-SGD, on the real
all-MiniLM-L6-v2 and SST-2."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from fedtune.config import RunConfig
from fedtune.model import (
    LoraSettings,
    build_peft_model,
    get_trainable_state,
    load_model_and_tokenizer,
    set_trainable_state,
)
from fedtune.train import TrainConfig, train_local

CPU = torch.device("cpu")
DP = TrainConfig(
    batch_size=8,
    steps=3,
    learning_rate=1e-2,
    noise_multiplier=1.0,
    max_grad_norm=1.0,
    seed=4,
    dp_randomness="seeded",
    physical_batch_size=4,  # two micro-batches per step: accumulation across them too
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def base_and_data(glue_dir: Path) -> tuple[nn.Module, Any]:
    from fedtune.batching import pack_dataset
    from fedtune.data.glue import load_glue
    from fedtune.data.tokenize import tokenize_dataset

    base, tokenizer = load_model_and_tokenizer(None, 2, seed=0)
    data = load_glue("sst2", glue_dir, seed=0, max_train_examples=40, max_eval_examples=8)
    return base, pack_dataset(tokenize_dataset(data.train, tokenizer, data.spec, max_length=32), tokenizer)


def _model(base: nn.Module, ffa: bool, seed: int = 0) -> nn.Module:
    return build_peft_model(copy.deepcopy(base), LoraSettings(rank=4, ffa=ffa), seed=seed)


def _named(model: nn.Module, part: str) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if f".{part}." in n}


def test_ffa_freezes_every_lora_a_and_keeps_it_out_of_the_state(base_and_data: tuple[nn.Module, Any]) -> None:
    ffa, plain = _model(base_and_data[0], True), _model(base_and_data[0], False)
    a, b = _named(ffa, "lora_A"), _named(ffa, "lora_B")
    assert len(a) == len(b) == 12  # query and value of 6 layers
    assert not any(p.requires_grad for p in a.values()) and all(p.requires_grad for p in b.values())
    state, plain_state = get_trainable_state(ffa), get_trainable_state(plain)
    assert not any(".lora_A." in k for k in state)
    assert set(b) <= set(state) and any("classifier" in k for k in state)
    assert set(plain_state) - set(state) == set(a)  # exactly the A matrices are gone
    assert sum(v.numel() for v in state.values()) == sum(v.numel() for v in plain_state.values()) - sum(
        p.numel() for p in a.values()
    )
    # same seed: FFA's frozen A is plain LoRA's initial A
    plain_a = _named(plain, "lora_A")
    assert all(torch.equal(a[k], plain_a[k]) for k in a)
    # the exchanged state round-trips into an FFA model; a plain-LoRA state (with A) is refused
    set_trainable_state(_model(base_and_data[0], True), state)
    with pytest.raises(ValueError, match="lora_A"):
        set_trainable_state(_model(base_and_data[0], True), plain_state)


def test_dp_training_leaves_every_lora_a_bitwise_unchanged(base_and_data: tuple[nn.Module, Any]) -> None:
    base, train = base_and_data
    model = _model(base, True)
    a_before = {k: p.detach().clone() for k, p in _named(model, "lora_A").items()}
    before = get_trainable_state(model)
    result = train_local(model, train, None, DP, CPU, in_place=True)
    assert result.steps == 3 and math.isfinite(result.mean_loss) and result.examples_seen > 0
    a_after = _named(model, "lora_A")
    assert all(torch.equal(a_after[k].detach(), a_before[k]) for k in a_before)
    assert not any(p.requires_grad for p in a_after.values())  # still frozen after Opacus detached
    assert all(p.grad is None and not hasattr(p, "grad_sample") for p in a_after.values())
    changed_b = [k for k in result.state if ".lora_B." in k and not torch.equal(result.state[k], before[k])]
    assert changed_b and all(float(result.state[k].abs().max()) > 0 for k in changed_b)  # B moved off zero
    assert any("classifier" in k and not torch.equal(result.state[k], before[k]) for k in result.state)
    assert set(result.state) == set(before)  # still no A in what a client sends
    # the optimizer only ever held the trainable tensors (no state for A)
    assert result.optimizer_state is not None
    assert len(result.optimizer_state["param_groups"][0]["params"]) == len(before)


def test_plain_lora_still_trains_a(base_and_data: tuple[nn.Module, Any]) -> None:
    base, train = base_and_data
    model = _model(base, False)
    a = _named(model, "lora_A")
    assert a and all(p.requires_grad for p in a.values())
    before = get_trainable_state(model)
    result = train_local(model, train, None, DP, CPU)
    moved = [k for k in a if not torch.equal(result.state[k], before[k])]
    assert sorted(moved) == sorted(a)


def test_same_seed_templates_share_a(base_and_data: tuple[nn.Module, Any]) -> None:
    """Every client builds its template from the run's seed: identical frozen A everywhere, so
    averaging the clients' B averages their updates B A exactly."""
    from fedtune.workload import build_template

    config = RunConfig(ffa_lora=True, seed=5, lora_rank=4)
    first, _ = build_template(config, 2)
    second, _ = build_template(config, 2)
    a1, a2 = _named(first, "lora_A"), _named(second, "lora_A")
    assert a1 and all(torch.equal(a1[k], a2[k]) for k in a1)
    assert not any(p.requires_grad for p in a1.values())  # RunConfig.ffa_lora reached LoraSettings
    assert all(float(p.abs().max()) > 0 for p in a1.values())  # a random init, not zeros
    # A depends on the seed alone (not on the base model's load): another seed, another A
    same = _named(_model(base_and_data[0], True, seed=5), "lora_A")
    other = _named(_model(base_and_data[0], True, seed=6), "lora_A")
    assert all(torch.equal(a1[k], same[k]) for k in a1)
    assert not any(torch.equal(a1[k], other[k]) for k in a1)
    # averaging B over clients sharing A is averaging their Delta W = B A
    key_b = next(k for k in get_trainable_state(first) if ".lora_B." in k)
    shared_a = a1[key_b.replace(".lora_B.", ".lora_A.")].detach()
    gen = torch.Generator().manual_seed(0)
    bs = torch.randn((3, *get_trainable_state(first)[key_b].shape), generator=gen)
    torch.testing.assert_close(bs.mean(0) @ shared_a, (bs @ shared_a).mean(0))
