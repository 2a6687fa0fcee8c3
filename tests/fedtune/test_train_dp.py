"""Tests of fedtune.train: DP-SGD mechanics (per-sample gradients, clipping, noise, Poisson
sampling, empty batches) on the real all-MiniLM-L6-v2 with LoRA, and learning on real SST-2."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from fedtune.model import (
    LoraSettings,
    build_peft_model,
    get_trainable_state,
    load_model_and_tokenizer,
    set_trainable_state,
)
from fedtune.train import (
    EmptySafeCollator,
    StepProgress,
    TrainConfig,
    attach_dp,
    batch_size_of,
    detach_dp,
    dp_step,
    plain_step,
    poisson_loader,
    train_local,
)

CPU = torch.device("cpu")


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tokenizer_and_base() -> tuple[Any, nn.Module]:
    base, tokenizer = load_model_and_tokenizer(None, 2, seed=0)
    return tokenizer, base


@pytest.fixture(scope="module")
def exact_base(tokenizer_and_base: tuple[Any, nn.Module]) -> nn.Module:
    """The base model without dropout: gradients are deterministic functions of the batch."""
    base = copy.deepcopy(tokenizer_and_base[1])
    for module in base.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return base


@pytest.fixture(scope="module")
def sst2(glue_dir: Path, tokenizer_and_base: tuple[Any, nn.Module]) -> dict[str, Any]:
    from fedtune.data.glue import load_glue
    from fedtune.data.tokenize import make_collator, tokenize_dataset

    tokenizer = tokenizer_and_base[0]
    data = load_glue("sst2", glue_dir, seed=0, max_train_examples=1500, max_eval_examples=400)
    return {
        "train": tokenize_dataset(data.train, tokenizer, data.spec, max_length=64),
        "eval": tokenize_dataset(data.eval, tokenizer, data.spec, max_length=128),
        "collator": make_collator(tokenizer),
    }


def _peft(base: nn.Module, seed: int = 0, randomize: bool = True) -> nn.Module:
    """LoRA model; with ``randomize`` LoRA B and the head get random values (B=0 at init
    would make every LoRA A gradient exactly zero and the checks vacuous)."""
    model = build_peft_model(copy.deepcopy(base), LoraSettings(), seed=seed)
    if randomize:
        gen = torch.Generator().manual_seed(seed + 100)
        state = {k: torch.randn(v.shape, generator=gen) * 0.05 for k, v in get_trainable_state(model).items()}
        set_trainable_state(model, state)
    model.train()
    return model


def _batch(sst2: dict[str, Any], rows: list[int]) -> dict[str, torch.Tensor]:
    return sst2["collator"]([sst2["train"][i] for i in rows])


def _varied_rows(sst2: dict[str, Any], count: int) -> list[int]:
    """Rows of clearly different lengths, so that batches carry real padding."""
    lengths = np.array([len(x) for x in sst2["train"]["input_ids"][:300]])
    order = np.argsort(lengths)
    picks = np.linspace(0, len(order) - 1, count).round().astype(int)
    return [int(order[i]) for i in picks]


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _per_example_grads(model: nn.Module, sst2: dict[str, Any], rows: list[int]) -> list[dict[str, torch.Tensor]]:
    """Autograd gradients of each example's loss, one example at a time (no padding)."""
    out = []
    for row in rows:
        model.zero_grad(set_to_none=True)
        model(**_batch(sst2, [row])).loss.backward()
        out.append({n: p.grad.detach().clone() for n, p in _trainable(model).items()})
    model.zero_grad(set_to_none=True)
    return out


def _sgd(model: nn.Module, lr: float = 1.0) -> torch.optim.Optimizer:
    return torch.optim.SGD(list(_trainable(model).values()), lr=lr)


# ---------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"batch_size": 0}, r"batch_size.*>= 1.*0"),
        ({"batch_size": 2.0}, r"batch_size.*2\.0"),
        ({"steps": 0}, r"steps.*>= 1.*0"),
        ({"learning_rate": 0.0}, r"learning_rate.*\(0\.0, inf\).*0\.0"),
        ({"learning_rate": math.inf}, r"learning_rate.*inf"),
        ({"max_grad_norm": -1.0}, r"max_grad_norm.*-1\.0"),
        ({"noise_multiplier": -0.5}, r"noise_multiplier.*\[0\.0, inf\).*-0\.5"),
        ({"noise_multiplier": math.nan}, r"noise_multiplier.*nan"),
        ({"optimizer": "adam"}, r"optimizer.*adamw, sgd.*'adam'"),
        ({"weight_decay": -1e-3}, r"weight_decay"),
        ({"momentum": 1.0}, r"momentum.*\[0\.0, 1\.0\).*1\.0"),
        ({"seed": -1}, r"seed.*-1"),
        ({"dp_randomness": "os"}, r"dp_randomness.*secret, seeded.*'os'"),
        ({"log_every": 0}, r"log_every.*0"),
    ],
)
def test_config_validation(kwargs: dict[str, Any], pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        TrainConfig(**kwargs)


def test_config_defaults() -> None:
    c = TrainConfig()
    assert (c.optimizer, c.noise_multiplier, c.private) == ("adamw", None, False)
    assert TrainConfig(noise_multiplier=0.0).private


# ---------------------------------------------------------------- per-sample gradients


def test_opacus_per_sample_grads_equal_autograd(exact_base: nn.Module, sst2: dict[str, Any]) -> None:
    """Guards against Opacus/peft combinations that silently corrupt LoRA per-sample grads."""
    model = _peft(exact_base)
    rows = _varied_rows(sst2, 6)
    batch = _batch(sst2, rows)
    assert int(batch["attention_mask"].sum(1).min()) < batch["attention_mask"].shape[1]  # padded
    expected = _per_example_grads(model, sst2, rows)

    gsm, dp_opt = attach_dp(model, _sgd(model), noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=len(rows))
    gsm(**batch).loss.backward()
    names = list(_trainable(model))
    assert len(names) == 26  # 24 LoRA A/B + classifier weight/bias
    for name, param in _trainable(model).items():
        assert param.grad_sample.shape == (len(rows), *param.shape), name
        for i in range(len(rows)):
            ref = expected[i][name]
            assert float(ref.abs().max()) > 0, name
            torch.testing.assert_close(
                param.grad_sample[i],
                ref,
                rtol=1e-4,
                atol=1e-5 * float(ref.abs().max()),
                msg=lambda m, n=name, i=i: f"{n}, example {i}: {m}",
            )
    detach_dp(gsm)


# ---------------------------------------------------------------- clipping


def test_clipping_bounds_each_contribution(exact_base: nn.Module, sst2: dict[str, Any]) -> None:
    model = _peft(exact_base)
    rows = _varied_rows(sst2, 6)
    per_example = _per_example_grads(model, sst2, rows)
    norms = torch.stack([torch.sqrt(sum((g**2).sum() for g in d.values())) for d in per_example])
    clip = float(norms.median()) * 0.5  # clips most examples, not necessarily all

    gsm, dp_opt = attach_dp(model, _sgd(model), noise_multiplier=0.0, max_grad_norm=clip, expected_batch_size=len(rows))
    dp_step(gsm, dp_opt, _batch(sst2, rows), CPU)
    params = _trainable(model)
    gs_norms = torch.stack([p.grad_sample.reshape(len(rows), -1).norm(dim=1) for p in params.values()], dim=1).norm(
        dim=1
    )
    torch.testing.assert_close(gs_norms, norms, rtol=1e-4, atol=0)
    factors = (clip / (gs_norms + 1e-6)).clamp(max=1.0)
    assert int((factors < 1).sum()) >= 3
    contrib_norms = factors * gs_norms
    assert float(contrib_norms.max()) <= clip + 1e-6
    for name, p in params.items():  # the summed clipped gradient is sum_i factor_i * g_i
        expected = torch.einsum("i,i...->...", factors, p.grad_sample)
        torch.testing.assert_close(p.summed_grad, expected, rtol=1e-5, atol=1e-9, msg=name)
    detach_dp(gsm)

    # One example per step: the actual summed clipped gradient and the actual parameter
    # update (SGD, lr 1, B = 1) have norm <= C, for examples far above C.
    for row, raw in zip(rows, norms):
        model1 = _peft(exact_base)
        before = get_trainable_state(model1)
        gsm, dp_opt = attach_dp(model1, _sgd(model1), noise_multiplier=0.0, max_grad_norm=clip, expected_batch_size=1)
        dp_step(gsm, dp_opt, _batch(sst2, [row]), CPU)
        summed = torch.sqrt(sum((p.summed_grad**2).sum() for p in _trainable(model1).values()))
        assert float(summed) <= clip + 1e-6
        if float(raw) > clip:
            assert float(summed) == pytest.approx(clip, rel=1e-4)
        detach_dp(gsm)
        after = get_trainable_state(model1)
        update = torch.sqrt(sum(((after[k] - before[k]) ** 2).sum() for k in before))
        assert float(update) <= clip * (1 + 1e-5) + 1e-6


# ---------------------------------------------------------------- noise


def _noise_std_check(noise: torch.Tensor, expected_std: float) -> None:
    n = noise.numel()
    assert n > 10_000
    std = float(noise.double().std())
    # sd of a sample std is std / sqrt(2n) (0.26% here): 2% is a > 7-sigma band
    assert std == pytest.approx(expected_std, rel=0.02)
    assert abs(float(noise.double().mean())) < 5 * expected_std / math.sqrt(n)
    # Gaussian tails: ~0.27% of values beyond 3 std
    beyond = float((noise.abs() > 3 * expected_std).double().mean())
    assert 0.0015 < beyond < 0.004


def test_empty_batch_step_adds_noise_of_std_sigma_c_over_b(exact_base: nn.Module) -> None:
    sigma, clip, expected_b = 1.5, 0.8, 16
    model = _peft(exact_base)
    before = get_trainable_state(model)
    gsm, dp_opt = attach_dp(
        model,
        _sgd(model),
        noise_multiplier=sigma,
        max_grad_norm=clip,
        expected_batch_size=expected_b,
        noise_generator=torch.Generator().manual_seed(5),
    )
    empty = EmptySafeCollator(lambda xs: xs, ["input_ids", "attention_mask", "label"])([])
    assert dp_step(gsm, dp_opt, empty, CPU) is None  # no loss, but a step
    detach_dp(gsm)
    after = get_trainable_state(model)
    update = torch.cat([(after[k] - before[k]).flatten() for k in before])
    assert bool((update != 0).all())  # every coordinate got noise
    _noise_std_check(-update, sigma * clip / expected_b)


def test_noise_on_a_real_batch_has_std_sigma_c_over_b(exact_base: nn.Module, sst2: dict[str, Any]) -> None:
    sigma, clip, expected_b = 0.7, 0.5, 8
    model = _peft(exact_base)
    gsm, dp_opt = attach_dp(
        model,
        _sgd(model),
        noise_multiplier=sigma,
        max_grad_norm=clip,
        expected_batch_size=expected_b,
        noise_generator=torch.Generator().manual_seed(6),
    )
    dp_step(gsm, dp_opt, _batch(sst2, list(range(8))), CPU)
    # p.grad = (sum of clipped grads + noise) / B, p.summed_grad = sum of clipped grads
    noise = torch.cat([(p.grad / 1.0 - p.summed_grad / expected_b).flatten() for p in _trainable(model).values()])
    detach_dp(gsm)
    _noise_std_check(noise, sigma * clip / expected_b)


def test_noise_is_reproducible_from_the_generator(exact_base: nn.Module) -> None:
    updates = []
    for seed in (1, 1, 2):
        model = _peft(exact_base)
        before = get_trainable_state(model)
        gsm, dp_opt = attach_dp(
            model,
            _sgd(model),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            expected_batch_size=4,
            noise_generator=torch.Generator().manual_seed(seed),
        )
        dp_step(gsm, dp_opt, {"input_ids": torch.zeros((0, 0), dtype=torch.long)}, CPU)
        detach_dp(gsm)
        after = get_trainable_state(model)
        updates.append(torch.cat([(after[k] - before[k]).flatten() for k in before]))
    assert torch.equal(updates[0], updates[1]) and not torch.equal(updates[0], updates[2])


# ---------------------------------------------------------------- DP step == plain step


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_noiseless_unclipped_dp_step_equals_plain_step(
    exact_base: nn.Module, sst2: dict[str, Any], optimizer: str
) -> None:
    from fedtune.train import make_optimizer

    # Adam's first step is lr * g / (|g| + eps): on coordinates whose gradient is ~eps (the
    # float rounding of two summation orders is then a visible fraction of g) it can differ
    # by up to ~lr * 1e-3 between two correct implementations, so Adam uses a small lr.
    lr = 2e-4 if optimizer == "adamw" else 0.5
    config = TrainConfig(optimizer=optimizer, learning_rate=lr)
    rows = _varied_rows(sst2, 8)
    batch = _batch(sst2, rows)

    plain = _peft(exact_base)
    plain_opt = make_optimizer(list(_trainable(plain).values()), config)
    private = _peft(exact_base)
    gsm, dp_opt = attach_dp(
        private,
        make_optimizer(list(_trainable(private).values()), config),
        noise_multiplier=0.0,
        max_grad_norm=1e6,
        expected_batch_size=len(rows),
    )
    start = get_trainable_state(plain)
    plain_step(plain, plain_opt, batch, CPU)
    dp_step(gsm, dp_opt, batch, CPU)
    # the privatized gradient (sum of unclipped per-sample grads / B) is the plain mean grad
    plain_grads = {n: p.grad for n, p in _trainable(plain).items()}
    for n, p in _trainable(private).items():
        scale = float(plain_grads[n].abs().max())
        torch.testing.assert_close(p.grad, plain_grads[n], rtol=1e-4, atol=1e-5 * scale)
    detach_dp(gsm)
    a, b = get_trainable_state(plain), get_trainable_state(private)
    moved = max(float((a[k] - start[k]).abs().max()) for k in a)
    assert moved > 0.5 * lr * (1 if optimizer == "adamw" else 1e-3)  # the step did something
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")


# ---------------------------------------------------------------- Poisson sampling


def test_poisson_batch_sizes_match_binomial(sst2: dict[str, Any]) -> None:
    train = sst2["train"].select(range(500))
    n, q, draws = len(train), 0.04, 300
    loader = poisson_loader(train, sst2["collator"], q, torch.Generator().manual_seed(0))
    sizes: list[int] = []
    while len(sizes) < draws:
        sizes.extend(batch_size_of(b) for b in loader)
    sizes_arr = np.array(sizes[:draws], dtype=float)
    mean, var = n * q, n * q * (1 - q)
    assert abs(sizes_arr.mean() - mean) < 4 * math.sqrt(var / draws)
    assert sizes_arr.var(ddof=1) == pytest.approx(var, rel=0.35)  # sd of s^2 ~ 8%
    assert len(set(sizes_arr)) > 5  # sizes really vary


def test_empty_poisson_batches_collate_to_empty_dicts(sst2: dict[str, Any]) -> None:
    train = sst2["train"].select(range(20))
    collate = EmptySafeCollator(sst2["collator"], train.column_names)
    empty = collate([])
    assert set(empty) == set(train.column_names)
    assert batch_size_of(empty) == 0 and empty["input_ids"].dtype == torch.long
    assert batch_size_of(collate([train[0], train[1]])) == 2
    # q = 1/20 gives an empty batch 36% of the time; some draws (the very first among them)
    # must be empty and still come out as dicts
    loader = poisson_loader(train, sst2["collator"], 0.05, torch.Generator().manual_seed(0))
    sizes = [batch_size_of(b) for _ in range(5) for b in loader]
    assert sizes.count(0) > 10
    first_empty_seed = next(
        s for s in range(100) if not (torch.rand(20, generator=torch.Generator().manual_seed(s)) < 0.05).any()
    )
    loader = poisson_loader(train, sst2["collator"], 0.05, torch.Generator().manual_seed(first_empty_seed))
    first = next(iter(loader))
    assert isinstance(first, dict) and batch_size_of(first) == 0


# ---------------------------------------------------------------- train_local


def _no_opacus_leftovers(model: nn.Module) -> None:
    for module in model.modules():
        assert not module._forward_hooks and not module._backward_hooks, type(module).__name__
        assert "activations" not in module.__dict__
    for p in model.parameters():
        for attr in ("grad_sample", "summed_grad", "_forward_counter"):
            assert not hasattr(p, attr), attr


def test_detach_dp_leaves_nothing_behind(exact_base: nn.Module, sst2: dict[str, Any]) -> None:
    model = _peft(exact_base)
    hooks_before = sum(len(m._forward_hooks) + len(m._backward_hooks) for m in model.modules())
    for _ in range(2):  # attaching again after a detach must work (no "hooks twice" error)
        gsm, dp_opt = attach_dp(
            model, _sgd(model, lr=0.1), noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4
        )
        assert sum(len(m._forward_hooks) for m in model.modules()) > hooks_before
        dp_step(gsm, dp_opt, _batch(sst2, [0, 1, 2, 3]), CPU)
        assert detach_dp(gsm) is model
        _no_opacus_leftovers(model)
    assert hooks_before == 0


def test_train_local_dp_counts_steps_and_cleans_up(
    tokenizer_and_base: tuple[Any, nn.Module], sst2: dict[str, Any]
) -> None:
    model = _peft(tokenizer_and_base[1], randomize=False)
    before = get_trainable_state(model)
    train = sst2["train"].select(range(40))
    config = TrainConfig(
        batch_size=8, steps=3, noise_multiplier=1.0, max_grad_norm=1.0, seed=3, log_every=1, dp_randomness="seeded"
    )
    reports: list[StepProgress] = []
    results = [train_local(model, train, sst2["collator"], config, CPU, progress=reports.append) for _ in range(2)]
    r = results[0]
    assert (r.steps, r.num_examples, r.noise_multiplier, r.max_grad_norm) == (3, 40, 1.0, 1.0)
    assert r.sampling_rate == 8 / 40
    assert [x.step for x in reports] == [1, 2, 3, 1, 2, 3]
    assert r.examples_seen == sum(x.batch_size for x in reports[:3])
    assert r.seconds > 0 and math.isfinite(r.mean_loss)
    # deterministic for a seed; the caller's model is untouched and carries no Opacus state
    assert all(torch.equal(results[0].state[k], results[1].state[k]) for k in before)
    assert all(torch.equal(get_trainable_state(model)[k], before[k]) for k in before)
    assert not all(torch.equal(r.state[k], before[k]) for k in before)
    assert list(r.state) == list(before)
    _no_opacus_leftovers(model)
    other = train_local(model, train, sst2["collator"], TrainConfig(**{**config.__dict__, "seed": 4}), CPU)
    assert not all(torch.equal(other.state[k], r.state[k]) for k in before)


def test_dp_randomness_is_secret_by_default(tokenizer_and_base: tuple[Any, nn.Module], sst2: dict[str, Any]) -> None:
    """With the default, knowing the seed does not let anyone recompute the noise or batches."""
    model = _peft(tokenizer_and_base[1], randomize=False)
    train = sst2["train"].select(range(16))
    config = TrainConfig(batch_size=4, steps=1, noise_multiplier=1.0, seed=3)
    assert config.dp_randomness == "secret"
    a, b = (train_local(model, train, sst2["collator"], config, CPU) for _ in range(2))
    assert not all(torch.equal(a.state[k], b.state[k]) for k in a.state)


def test_train_local_empty_batches_are_noisy_steps(
    tokenizer_and_base: tuple[Any, nn.Module], sst2: dict[str, Any]
) -> None:
    model = _peft(tokenizer_and_base[1], randomize=False)
    before = get_trainable_state(model)
    train = sst2["train"].select(range(8))
    config = TrainConfig(
        batch_size=1, steps=12, noise_multiplier=1.0, learning_rate=1e-3, seed=0, dp_randomness="seeded"
    )
    result = train_local(model, train, sst2["collator"], config, CPU)
    # q = 1/8: each batch is empty with probability (7/8)^8 = 0.34
    assert result.steps == 12 and 1 <= result.empty_batches <= 11
    assert result.examples_seen >= 12 - result.empty_batches
    # A single-step run whose only batch is empty still moves every coordinate (AdamW's
    # first step is lr * sign(noise)).
    for seed in range(40):
        one = train_local(
            model, train, sst2["collator"], TrainConfig(**{**config.__dict__, "steps": 1, "seed": seed}), CPU
        )
        if one.empty_batches == 1:
            break
    else:  # pragma: no cover - probability 0.66^40
        pytest.fail("no empty first batch in 40 seeds")
    assert one.examples_seen == 0 and math.isnan(one.mean_loss)
    delta = torch.cat([(one.state[k] - before[k]).flatten() for k in before]).abs()
    assert bool((delta > 0).all()) and float(delta.max()) <= 1e-3 * (1 + 1e-5)
    # |noise| ~ N(0, 1) here: all but the coordinates with |noise| ~ Adam's eps move by lr
    assert float(((delta - 1e-3).abs() < 1e-6).double().mean()) > 0.999


def test_train_local_rejects_impossible_dp_sampling(
    tokenizer_and_base: tuple[Any, nn.Module], sst2: dict[str, Any]
) -> None:
    model = _peft(tokenizer_and_base[1], randomize=False)
    small = sst2["train"].select(range(4))
    with pytest.raises(ValueError, match="batch_size 8 exceeds the 4"):
        train_local(model, small, sst2["collator"], TrainConfig(batch_size=8, noise_multiplier=1.0), CPU)
    with pytest.raises(ValueError, match="empty"):
        train_local(model, small.select([]), sst2["collator"], TrainConfig(), CPU)


# ---------------------------------------------------------------- learning on real SST-2


def _accuracy(model: nn.Module, state: dict[str, torch.Tensor], sst2: dict[str, Any]) -> float:
    from fedtune.evaluate import evaluate

    set_trainable_state(model, state)
    return evaluate(model, sst2["eval"], sst2["collator"], "sst2", CPU)["accuracy"]


@pytest.mark.slow
def test_non_private_training_learns_sst2(tokenizer_and_base: tuple[Any, nn.Module], sst2: dict[str, Any]) -> None:
    labels = np.array(sst2["eval"]["labels"])
    majority = max(labels.mean(), 1 - labels.mean())
    assert majority < 0.56
    model = _peft(tokenizer_and_base[1], randomize=False)
    result = train_local(model, sst2["train"], sst2["collator"], TrainConfig(batch_size=32, steps=40), CPU)
    accuracy = _accuracy(model, result.state, sst2)
    assert accuracy >= 0.70, f"accuracy {accuracy:.3f} (majority {majority:.3f})"
    assert result.mean_loss < math.log(2)


@pytest.mark.slow
def test_clipped_low_noise_dp_training_learns(tokenizer_and_base: tuple[Any, nn.Module], sst2: dict[str, Any]) -> None:
    """The DP path (Poisson batches, per-example clipping at C = 1, noise) still learns with little noise.

    Measured while building this test (B = 64, 60 steps, 4,000 examples): sigma = 0.01 reaches 0.78 dev
    accuracy, while sigma ~ 0.5 (epsilon 8 here) stays at the majority rate: at these batch sizes the
    noise per coordinate (sigma C / B) exceeds the clipped signal of ~75k adapter parameters. Larger
    batches and more data are needed for useful DP utility (issue 4 measures it).
    """
    model = _peft(tokenizer_and_base[1], randomize=False)
    config = TrainConfig(batch_size=32, steps=80, noise_multiplier=0.01, max_grad_norm=1.0, dp_randomness="seeded")
    result = train_local(model, sst2["train"], sst2["collator"], config, CPU)
    assert result.sampling_rate == pytest.approx(32 / 1500)
    accuracy = _accuracy(model, result.state, sst2)
    assert accuracy >= 0.65, f"DP accuracy {accuracy:.3f}"


@pytest.mark.slow
def test_modest_noise_dp_training_learns_a_ranking(
    tokenizer_and_base: tuple[Any, nn.Module], sst2: dict[str, Any]
) -> None:
    """sigma 0.8, B 32, 80 steps (q = 0.021) on 1,500 examples: too noisy to classify well,
    but the dev ranking must improve. Observed: every dev example lands on the train majority
    class (accuracy = the minority rate 0.495 for both seeds tried: the class prior is the
    strongest signal and the logits' common mode drifts with the noise), yet the logit margin
    ranks dev examples with AUC 0.73 (seed 0) / 0.70 (seed 1), against ~0.55 untrained. The
    AUC's standard error on 400 examples is ~0.025."""
    from sklearn.metrics import roc_auc_score
    from torch.utils.data import DataLoader

    model = _peft(tokenizer_and_base[1], randomize=False)
    config = TrainConfig(batch_size=32, steps=80, noise_multiplier=0.8, max_grad_norm=1.0, dp_randomness="seeded")
    result = train_local(model, sst2["train"], sst2["collator"], config, CPU)
    assert result.steps == 80 and result.noise_multiplier == 0.8
    assert 0.8 * 80 * 32 < result.examples_seen < 1.2 * 80 * 32  # Poisson: q N per step on average

    def margins() -> np.ndarray:
        model.eval()
        out = []
        with torch.no_grad():
            for batch in DataLoader(sst2["eval"], batch_size=100, collate_fn=sst2["collator"]):
                logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
                out.append((logits[:, 1] - logits[:, 0]).numpy())
        model.train()
        return np.concatenate(out)

    labels = np.array(sst2["eval"]["labels"])
    auc_before = roc_auc_score(labels, margins())
    set_trainable_state(model, result.state)
    auc_after = roc_auc_score(labels, margins())
    assert auc_after >= 0.62, f"DP dev AUC {auc_after:.3f} (before training {auc_before:.3f})"
    assert auc_after > auc_before + 0.05
