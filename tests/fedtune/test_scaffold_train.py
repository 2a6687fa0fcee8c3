"""SCAFFOLD inside local training (fedtune.train.GradientHook, train_local's gradient_correction and
track_mean_gradient), on the real all-MiniLM-L6-v2 with Opacus DP-SGD: the recorded variate is the mean
of the gradients the optimizer actually received (clipped and noised), the correction enters every
step exactly, and a correction that does not fit the model is refused."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from fedtune.model import LoraSettings, build_peft_model, get_trainable_state, load_model_and_tokenizer
from fedtune.train import TrainConfig, train_local

CPU = torch.device("cpu")
LR, STEPS, BATCH = 0.05, 3, 8
SGD = TrainConfig(
    batch_size=BATCH,
    steps=STEPS,
    learning_rate=LR,
    optimizer="sgd",
    noise_multiplier=1.0,
    max_grad_norm=1.0,
    seed=3,
    dp_randomness="seeded",
    physical_batch_size=4,  # two micro-batches per step: the hook must fire once per logical step
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model_and_data(glue_dir: Path) -> tuple[nn.Module, Any]:
    from fedtune.batching import pack_dataset
    from fedtune.data.glue import load_glue
    from fedtune.data.tokenize import tokenize_dataset

    base, tokenizer = load_model_and_tokenizer(None, 2, seed=0)
    data = load_glue("sst2", glue_dir, seed=0, max_train_examples=40, max_eval_examples=8)
    model = build_peft_model(base, LoraSettings(rank=4), seed=0)
    return model, pack_dataset(tokenize_dataset(data.train, tokenizer, data.spec, max_length=32), tokenizer)


def _correction(model: nn.Module, scale: float) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(11)
    return {k: scale * torch.randn(v.shape, generator=gen) for k, v in get_trainable_state(model).items()}


@pytest.mark.parametrize("private", [True, False], ids=["dp", "non-private"])
def test_sgd_moves_by_the_recorded_mean_gradient_plus_the_correction(
    model_and_data: tuple[nn.Module, Any], private: bool
) -> None:
    """SGD: x - y = K lr (mean_t g_t + (c - c_k)), i.e. SCAFFOLD's option II equals the mean gradient."""
    model, data = model_and_data
    config = SGD if private else TrainConfig(**{**SGD.__dict__, "noise_multiplier": None})
    before = get_trainable_state(model)
    correction = _correction(model, 0.01)
    result = train_local(model, data, None, config, CPU, gradient_correction=correction, track_mean_gradient=True)
    assert result.mean_gradient is not None and set(result.mean_gradient) == set(before)
    for name, start in before.items():
        moved = (start - result.state[name]) / (STEPS * LR)
        torch.testing.assert_close(moved, result.mean_gradient[name] + correction[name], rtol=1e-4, atol=2e-6)
    assert get_trainable_state(model).keys() == before.keys()  # the caller's model is untouched (not in place)
    assert all(torch.equal(get_trainable_state(model)[k], v) for k, v in before.items())


def test_the_recorded_variate_carries_the_noise_actually_sampled(model_and_data: tuple[nn.Module, Any]) -> None:
    """With sigma = 50 the variate differs from the noise-free one by N(0, (sigma C / (B sqrt K))^2) per
    coordinate (same batches: the sampler's seed is the same), up to the few clipped gradients' drift."""
    model, data = model_and_data
    noisy = train_local(
        model, data, None, TrainConfig(**{**SGD.__dict__, "noise_multiplier": 50.0}), CPU, track_mean_gradient=True
    )
    clean = train_local(
        model, data, None, TrainConfig(**{**SGD.__dict__, "noise_multiplier": 0.0}), CPU, track_mean_gradient=True
    )
    assert noisy.mean_gradient is not None and clean.mean_gradient is not None
    diff = torch.cat([(noisy.mean_gradient[k] - clean.mean_gradient[k]).flatten() for k in noisy.mean_gradient])
    expected = 50.0 * 1.0 / (BATCH * math.sqrt(STEPS))
    assert diff.numel() > 10_000
    assert float(diff.std()) == pytest.approx(expected, rel=0.03)
    assert abs(float(diff.mean())) < 4 * expected / math.sqrt(diff.numel())
    # clipping: without noise step t's gradient is a sum of n_t per-example gradients, each clipped to
    # C = 1, divided by B, so the mean over K steps has norm <= C * sum_t n_t / (K B)
    norm = torch.cat([v.flatten() for v in clean.mean_gradient.values()]).norm()
    assert 0 < float(norm) <= 1.0 * clean.examples_seen / (STEPS * BATCH) + 1e-6


def test_a_correction_that_does_not_fit_the_model_is_refused(model_and_data: tuple[nn.Module, Any]) -> None:
    model, data = model_and_data
    correction = _correction(model, 0.01)
    name = next(iter(correction))
    with pytest.raises(ValueError, match="missing"):
        train_local(model, data, None, SGD, CPU, gradient_correction={k: v for k, v in correction.items() if k != name})
    wrong = dict(correction)
    wrong[name] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"has shape \(3,\)"):
        train_local(model, data, None, SGD, CPU, gradient_correction=wrong)
    extra = copy.copy(correction)
    extra["not.a.parameter"] = torch.zeros(1)
    with pytest.raises(ValueError, match="unknown"):
        train_local(model, data, None, SGD, CPU, gradient_correction=extra)
