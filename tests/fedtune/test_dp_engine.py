"""Tests of the DP engine's logical/physical batch split (fedtune.batching, fedtune.train):
micro-batched clipping equals single-batch clipping, one noise draw of std sigma*C/B per logical
step, empty logical batches, length-sorted packing, padding efficiency, bf16 clipping bounds,
memory trimming and progress reporting, on the real all-MiniLM-L6-v2 and real SST-2."""

from __future__ import annotations

import copy
import itertools
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from fedtune.batching import (
    MicroBatch,
    PackedDataset,
    auto_physical_batch_size,
    pack_dataset,
    partition_sorted,
)
from fedtune.model import (
    LoraSettings,
    build_peft_model,
    get_trainable_state,
    load_model_and_tokenizer,
    set_trainable_state,
)
from fedtune.train import (
    MemoryGuard,
    StepProgress,
    TrainConfig,
    attach_dp,
    bf16_supported,
    detach_dp,
    dp_logical_step,
    plain_logical_step,
    train_local,
)

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tokenizer_and_base() -> tuple[Any, nn.Module]:
    base, tokenizer = load_model_and_tokenizer(None, 2, seed=0)
    for module in base.modules():  # no dropout: gradients are deterministic functions of the batch
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return tokenizer, base


@pytest.fixture(scope="module")
def sst2(glue_dir: Path, tokenizer_and_base: tuple[Any, nn.Module]) -> dict[str, Any]:
    from fedtune.data.glue import load_glue
    from fedtune.data.tokenize import make_collator, tokenize_dataset

    tokenizer = tokenizer_and_base[0]
    data = load_glue("sst2", glue_dir, seed=0, max_train_examples=600, max_eval_examples=100)
    train = tokenize_dataset(data.train, tokenizer, data.spec, max_length=64)
    return {
        "train": train,
        "packed": pack_dataset(train, tokenizer),
        "collator": make_collator(tokenizer),
        "tokenizer": tokenizer,
    }


def _peft(base: nn.Module) -> nn.Module:
    model = build_peft_model(copy.deepcopy(base), LoraSettings(), seed=0)
    gen = torch.Generator().manual_seed(100)  # B = 0 at init would make every LoRA A gradient zero
    set_trainable_state(
        model, {k: torch.randn(v.shape, generator=gen) * 0.05 for k, v in get_trainable_state(model).items()}
    )
    model.train()
    return model


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _rows(packed: PackedDataset, count: int) -> np.ndarray:
    """Rows spread over the range of lengths, so micro-batches differ in width."""
    order = np.argsort(packed.lengths.numpy(), kind="stable")
    return order[np.linspace(0, len(order) - 1, count).round().astype(int)]


def _dp_run(
    base: nn.Module,
    micro: list[MicroBatch],
    *,
    sigma: float,
    clip: float,
    expected_b: int,
    noise_seed: int = 0,
    precision: str = "fp32",
) -> tuple[nn.Module, list[nn.Parameter]]:
    model = _peft(base)
    params = _trainable(model)
    gsm, opt = attach_dp(
        model,
        torch.optim.SGD(params, lr=1.0),
        noise_multiplier=sigma,
        max_grad_norm=clip,
        expected_batch_size=expected_b,
        noise_generator=torch.Generator().manual_seed(noise_seed),
    )
    dp_logical_step(gsm, opt, micro, CPU, precision)
    grads = [p.grad.detach().clone() for p in params]
    sums = [p.summed_grad.detach().clone() for p in params]
    detach_dp(gsm)
    model.grads, model.sums = grads, sums  # type: ignore[attr-defined]
    return model, params


# ---------------------------------------------------------------- logical vs physical batches


@pytest.mark.parametrize("clip", [0.05, 100.0])  # clipping binding for every example, and never
def test_noiseless_clipped_sum_over_micro_batches_equals_single_batch(
    tokenizer_and_base: tuple[Any, nn.Module], sst2: dict[str, Any], clip: float
) -> None:
    packed = sst2["packed"]
    rows = _rows(packed, 13)
    split = packed.micro_batches(rows, 4)
    whole = packed.micro_batches(rows, 64, overhead_tokens=10**9, min_efficiency=0.0)
    assert len(split) >= 4 and len(whole) == 1
    a, _ = _dp_run(tokenizer_and_base[1], split, sigma=0.0, clip=clip, expected_b=13)
    b, _ = _dp_run(tokenizer_and_base[1], whole, sigma=0.0, clip=clip, expected_b=13)
    for sa, sb in zip(a.sums, b.sums):  # type: ignore[attr-defined]
        torch.testing.assert_close(sa, sb, rtol=1e-4, atol=1e-6)
    for ga, gb in zip(a.grads, b.grads):  # type: ignore[attr-defined]
        torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-7)
    total = math.sqrt(sum(float((s**2).sum()) for s in a.sums))  # type: ignore[attr-defined]
    assert total <= 13 * clip * (1 + 1e-5)
    if clip < 1:  # every example clipped: the sum has a non-trivial norm, at most n * C
        assert total > 0.5 * clip


def test_one_noise_draw_per_logical_step_with_std_sigma_c_over_b(
    tokenizer_and_base: tuple[Any, nn.Module], sst2: dict[str, Any]
) -> None:
    sigma, clip, expected_b = 0.9, 0.5, 16
    packed = sst2["packed"]
    rows = _rows(packed, 12)
    split = packed.micro_batches(rows, 3)
    whole = packed.micro_batches(rows, 64, overhead_tokens=10**9, min_efficiency=0.0)
    a, _ = _dp_run(tokenizer_and_base[1], split, sigma=sigma, clip=clip, expected_b=expected_b, noise_seed=7)
    b, _ = _dp_run(tokenizer_and_base[1], whole, sigma=sigma, clip=clip, expected_b=expected_b, noise_seed=7)
    noise_a = torch.cat([(g - s / expected_b).flatten() for g, s in zip(a.grads, a.sums)])  # type: ignore[attr-defined]
    noise_b = torch.cat([(g - s / expected_b).flatten() for g, s in zip(b.grads, b.sums)])  # type: ignore[attr-defined]
    # the same generator state gives the same noise: one draw per logical step, however many micro-batches
    torch.testing.assert_close(noise_a, noise_b, rtol=1e-3, atol=1e-6)
    expected_std = sigma * clip / expected_b
    n = noise_a.numel()
    assert n > 50_000
    assert abs(float(noise_a.std()) / expected_std - 1) < 5 * math.sqrt(1 / (2 * n)) + 1e-3
    assert abs(float(noise_a.mean())) < 5 * expected_std / math.sqrt(n)


def test_empty_logical_batch_is_one_noisy_step(tokenizer_and_base: tuple[Any, nn.Module]) -> None:
    sigma, clip, expected_b = 1.2, 0.7, 32
    model = _peft(tokenizer_and_base[1])
    before = get_trainable_state(model)
    params = _trainable(model)
    gsm, opt = attach_dp(
        model,
        torch.optim.SGD(params, lr=1.0),
        noise_multiplier=sigma,
        max_grad_norm=clip,
        expected_batch_size=expected_b,
        noise_generator=torch.Generator().manual_seed(3),
    )
    assert dp_logical_step(gsm, opt, [], CPU) == (0.0, 0)
    detach_dp(gsm)
    update = torch.cat([(get_trainable_state(model)[k] - before[k]).flatten() for k in before])
    assert bool((update != 0).all())
    assert abs(float(update.std()) / (sigma * clip / expected_b) - 1) < 0.02


def test_plain_logical_step_equals_one_big_batch(
    tokenizer_and_base: tuple[Any, nn.Module], sst2: dict[str, Any]
) -> None:
    packed = sst2["packed"]
    rows = _rows(packed, 10)
    states = []
    for micro in (
        packed.micro_batches(rows, 3),
        packed.micro_batches(rows, 64, overhead_tokens=10**9, min_efficiency=0.0),
    ):
        model = _peft(tokenizer_and_base[1])
        params = _trainable(model)
        loss_sum, n = plain_logical_step(model, torch.optim.SGD(params, lr=0.5), micro, CPU)
        assert n == 10 and loss_sum > 0
        states.append(get_trainable_state(model))
    for key in states[0]:
        torch.testing.assert_close(states[0][key], states[1][key], rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(not bf16_supported("cpu"), reason="this CPU has no bf16 support")
def test_bf16_clipping_bounds_each_example_exactly(
    tokenizer_and_base: tuple[Any, nn.Module], sst2: dict[str, Any]
) -> None:
    """Under bf16 autocast the per-sample gradients are float32 before their norms are taken, so
    each example's clipped contribution is at most C."""
    packed, clip = sst2["packed"], 1e-3
    for row in _rows(packed, 4):
        model, _ = _dp_run(
            tokenizer_and_base[1], packed.micro_batches([row], 8), sigma=0.0, clip=clip, expected_b=1, precision="bf16"
        )
        norm = math.sqrt(sum(float((s.double() ** 2).sum()) for s in model.sums))  # type: ignore[attr-defined]
        assert all(s.dtype == torch.float32 for s in model.sums)  # type: ignore[attr-defined]
        assert clip * 0.99 < norm <= clip * (1 + 1e-5)


def test_bf16_refused_on_a_device_without_it(
    monkeypatch: pytest.MonkeyPatch, tokenizer_and_base: tuple[Any, nn.Module], sst2: dict[str, Any]
) -> None:
    import fedtune.train as train_module

    monkeypatch.setattr(train_module, "bf16_supported", lambda device="cpu": False)
    with pytest.raises(ValueError, match=r"precision 'bf16' needs bfloat16 support.*cpu.*use 'fp32'"):
        train_local(
            _peft(tokenizer_and_base[1]),
            sst2["packed"],
            None,
            TrainConfig(batch_size=4, steps=1, precision="bf16"),
            CPU,
        )


# ---------------------------------------------------------------- packing and length-sorted micro-batches


def test_packed_micro_batches_equal_the_collators_batches(sst2: dict[str, Any]) -> None:
    packed = sst2["packed"]
    rows = _rows(packed, 20)
    micro = packed.micro_batches(rows, 6)
    lengths = packed.lengths.numpy()
    for mb in micro:
        assert mb.size <= 6
        width = mb.batch["input_ids"].shape[1]
        assert mb.computed_tokens == mb.size * width and mb.real_tokens == int(mb.batch["attention_mask"].sum())
        assert width == int(mb.batch["attention_mask"].sum(1).max())  # padded only to its own longest
    order = rows[np.argsort(lengths[rows], kind="stable")]
    start = 0
    for mb in micro:
        chunk = [int(i) for i in order[start : start + mb.size]]
        start += mb.size
        reference = sst2["collator"]([sst2["train"][i] for i in chunk])
        for key in ("input_ids", "attention_mask", "labels"):
            assert torch.equal(mb.batch[key], reference[key]), key
    assert start == len(rows)
    assert [m.batch["input_ids"].shape[1] for m in micro] == sorted(m.batch["input_ids"].shape[1] for m in micro)
    assert packed.micro_batches([], 8) == []


def test_packing_honours_left_padding(sst2: dict[str, Any]) -> None:
    tokenizer = copy.deepcopy(sst2["tokenizer"])
    tokenizer.padding_side = "left"
    train = sst2["train"].select(range(30))
    packed = pack_dataset(train, tokenizer)
    from transformers import DataCollatorWithPadding

    collator = DataCollatorWithPadding(tokenizer, padding="longest", return_tensors="pt")
    (micro,) = packed.micro_batches(list(range(30)), 30, overhead_tokens=10**9, min_efficiency=0.0)
    order = np.argsort(packed.lengths.numpy(), kind="stable")
    reference = collator([train[int(i)] for i in order])
    for key in ("input_ids", "attention_mask"):
        assert torch.equal(micro.batch[key], reference[key]), key
    assert bool((micro.batch["attention_mask"][:, -1] == 1).all())  # padding on the left


def test_partition_is_optimal_and_covers_every_example() -> None:
    rng = np.random.default_rng(0)
    for _ in range(40):
        n = int(rng.integers(1, 9))
        lengths = np.sort(rng.integers(1, 30, size=n))
        max_size = int(rng.integers(1, 5))
        overhead = int(rng.integers(0, 40))
        cuts = partition_sorted(lengths, max_size, overhead)
        assert cuts[0][0] == 0 and cuts[-1][1] == n and all(a[1] == b[0] for a, b in zip(cuts, cuts[1:]))
        assert all(0 < stop - start <= max_size for start, stop in cuts)

        def cost(cs: list[tuple[int, int]], lengths: np.ndarray = lengths, overhead: int = overhead) -> float:
            return float(sum((b - a) * lengths[b - 1] + overhead for a, b in cs))

        best = math.inf
        for mask in itertools.product([0, 1], repeat=n - 1):  # brute force over every cut
            points = [0, *[i + 1 for i, m in enumerate(mask) if m], n]
            cs = list(zip(points, points[1:]))
            if all(b - a <= max_size for a, b in cs):
                best = min(best, cost(cs))
        assert cost(cuts) == pytest.approx(best)


@pytest.mark.parametrize("logical_batch", [64, 256, 1024, 4096])
def test_padding_efficiency_at_least_80_percent_on_sst2(
    glue_dir: Path, tokenizer_and_base: tuple[Any, nn.Module], logical_batch: int
) -> None:
    import pandas as pd

    frame = pd.read_parquet(glue_dir / "sst2" / "hf_parquet" / "train-00000-of-00001.parquet", columns=["sentence"])
    lengths = torch.tensor([len(x) for x in tokenizer_and_base[0](list(frame["sentence"]))["input_ids"]])
    packed = PackedDataset({"input_ids": torch.zeros((len(lengths), 1), dtype=torch.long)}, lengths)
    packed.columns = {}  # only the lengths matter here
    rng = np.random.default_rng(1)
    real = computed = before = 0
    for _ in range(5):
        rows = np.nonzero(rng.random(len(lengths)) < logical_batch / len(lengths))[0]
        micro = packed.micro_batches(rows, 64)
        real += sum(m.real_tokens for m in micro)
        computed += sum(m.computed_tokens for m in micro)
        before += len(rows) * int(lengths[rows].max())
    assert real / computed >= 0.80
    assert real / before < 0.35  # a Poisson batch padded to its longest wastes most of its compute


def test_auto_physical_batch_size_follows_model_length_and_batch(tokenizer_and_base: tuple[Any, nn.Module]) -> None:
    config = tokenizer_and_base[1].config
    assert auto_physical_batch_size(config, 64) == 64  # MiniLM at SST-2's longest: the CPU cap
    assert auto_physical_batch_size(config, 512) < auto_physical_batch_size(config, 128) <= 64
    assert auto_physical_batch_size(config, 64, logical_batch_size=10) == 10
    assert auto_physical_batch_size(config, 64, budget_bytes=1) == 1


# ---------------------------------------------------------------- train_local with micro-batches


def test_train_local_reports_tokens_and_uses_micro_batches(
    tokenizer_and_base: tuple[Any, nn.Module], sst2: dict[str, Any]
) -> None:
    model = _peft(tokenizer_and_base[1])
    reports: list[StepProgress] = []
    config = TrainConfig(
        batch_size=64, steps=3, noise_multiplier=1.0, physical_batch_size=8, log_every=1, dp_randomness="seeded", seed=1
    )
    result = train_local(model, sst2["train"], sst2["collator"], config, CPU, progress=reports.append)
    assert result.physical_batch_size == 8 and result.steps == 3
    assert 0.8 <= result.padding_efficiency <= 1.0
    assert result.real_tokens == reports[-1].real_tokens and result.examples_seen == reports[-1].examples_seen
    assert reports[-1].examples_per_second > 0 and reports[1].eta_seconds >= 0
    # the same seed and a different physical batch: the same examples, the same noise, the same update
    other = train_local(model, sst2["packed"], None, TrainConfig(**{**config.__dict__, "physical_batch_size": 64}), CPU)
    for key in result.state:
        torch.testing.assert_close(result.state[key], other.state[key], rtol=1e-3, atol=1e-5)


def test_train_local_in_place_trains_the_given_model(
    tokenizer_and_base: tuple[Any, nn.Module], sst2: dict[str, Any]
) -> None:
    model = _peft(tokenizer_and_base[1])
    before = get_trainable_state(model)
    result = train_local(
        model, sst2["packed"], None, TrainConfig(batch_size=16, steps=2, noise_multiplier=1.0), CPU, in_place=True
    )
    after = get_trainable_state(model)
    assert all(torch.equal(after[k], result.state[k]) for k in after)
    assert not all(torch.equal(after[k], before[k]) for k in after)
    assert not any(hasattr(p, "grad_sample") or hasattr(p, "summed_grad") for p in model.parameters())


def test_train_local_needs_a_tokenizer_to_pack(tokenizer_and_base: tuple[Any, nn.Module], sst2: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="PackedDataset, or a collator with a .tokenizer"):
        train_local(
            _peft(tokenizer_and_base[1]), sst2["train"], lambda rows: rows, TrainConfig(batch_size=4, steps=1), CPU
        )


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"physical_batch_size": 0}, r"physical_batch_size.*>= 1.*0"),
        ({"precision": "fp16"}, r"precision.*fp32, bf16.*'fp16'"),
    ],
)
def test_config_rejects_bad_engine_settings(kwargs: dict[str, Any], pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        TrainConfig(**kwargs)


def test_run_config_carries_engine_settings_through_flower() -> None:
    from fedtune.config import RunConfig

    config = RunConfig(physical_batch_size=16, precision="bf16")
    assert RunConfig.from_flower(config.to_flower()) == config
    assert RunConfig.from_flower(RunConfig().to_flower()).physical_batch_size is None
    with pytest.raises(ValueError, match="precision must be one of fp32, bf16, got 'half'"):
        RunConfig(precision="half")
    with pytest.raises(ValueError, match="physical_batch_size must be an integer >= 1, got -2"):
        RunConfig(physical_batch_size=-2)


# ---------------------------------------------------------------- memory and progress


def test_memory_guard_trims_only_past_the_working_set(monkeypatch: pytest.MonkeyPatch) -> None:
    import fedtune.train as train_module

    calls: list[bool] = []
    monkeypatch.setattr(train_module, "release_memory", lambda collect=True: calls.append(collect))
    guard = MemoryGuard(slack_bytes=100, warmup_steps=2)
    rss = iter([1000, 1200, 1250, 1300, 1301, 1250])
    monkeypatch.setattr(
        guard, "_process", type("P", (), {"memory_info": lambda self: type("M", (), {"rss": next(rss)})()})()
    )
    for _ in range(6):
        guard()
    # one trim at the end of the warm-up (a clean start), then only past working set + slack
    assert guard.working_set == 1200 and guard.trims == 1 and calls == [False, False]


def test_progress_logs_one_line_per_round_off_a_terminal(caplog: pytest.LogCaptureFixture) -> None:
    from fedtune.progress import TrainingProgress

    caplog.set_level(logging.INFO, logger="fedtune.progress")
    with TrainingProgress("client 3 round 2", 10, epsilon_before=1.5, epsilon_after=2.25, terminal=False) as progress:
        for step in range(1, 11):
            progress(
                StepProgress(
                    step,
                    10,
                    64,
                    0.5,
                    0.5,
                    seconds=step * 2.0,
                    examples_seen=64 * step,
                    real_tokens=800 * step,
                    computed_tokens=1000 * step,
                )
            )
    lines = [r.getMessage() for r in caplog.records if r.name == "fedtune.progress"]
    assert len(lines) == 1
    assert "client 3 round 2: 10/10 steps, 32 ex/s, padding efficiency 80%" in lines[0]
    assert "epsilon 1.500 -> 2.250 (certified)" in lines[0]


def test_progress_bar_on_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    from fedtune.progress import TrainingProgress

    with TrainingProgress("client 0 round 1", 4, terminal=True) as progress:
        for step in range(1, 5):
            progress(
                StepProgress(
                    step,
                    4,
                    8,
                    0.4,
                    0.4,
                    seconds=float(step),
                    examples_seen=8 * step,
                    real_tokens=90 * step,
                    computed_tokens=100 * step,
                )
            )
    err = capsys.readouterr().err
    assert "client 0 round 1" in err and "4/4" in err and "pad 90%" in err and "no DP" in err
