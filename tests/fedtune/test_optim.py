"""Client optimizers and the plan-wide learning-rate schedule (fedtune.optim, fedtune.train, the
client's round plan and RunConfig): hand-computed schedules, DP-AdamBC against an independent numpy
implementation, and both applied by real train_local runs on all-MiniLM-L6-v2 with LoRA on SST-2."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import fedtune.train as train_module
from fedtune.client.job import optimizer_settings
from fedtune.config import RunConfig
from fedtune.model import LoraSettings, build_peft_model, get_trainable_state, load_model_and_tokenizer
from fedtune.optim import DPAdamBC, make_optimizer, scheduled_lr, set_lr
from fedtune.train import TrainConfig, train_local

CPU = torch.device("cpu")
BASE = 0.01


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------- the schedule, by hand

R2 = math.sqrt(2) / 4  # 0.5 * cos(pi / 4)


@pytest.mark.parametrize(
    ("schedule", "warmup", "expected"),
    [
        ("constant", 0, [1, 1, 1, 1]),
        ("constant", 2, [1 / 2, 1, 1, 1, 1]),
        # linear: (T - t + 1) / (T - W) after the warm-up; the last step keeps 1 / (T - W)
        ("linear", 0, [4 / 4, 3 / 4, 2 / 4, 1 / 4]),
        ("linear", 2, [1 / 2, 2 / 2, 4 / 4, 3 / 4, 2 / 4, 1 / 4]),
        # cosine: (1 + cos(pi k / (T - W))) / 2, k = 0 .. T - W - 1
        ("cosine", 0, [1, 0.5 + R2, 0.5, 0.5 - R2]),
        ("cosine", 1, [1, 1, 0.75, 0.25]),
        ("cosine", 3, [1 / 3, 2 / 3, 3 / 3, 1, 0.75, 0.25]),
    ],
)
def test_scheduled_lr_matches_hand_values(schedule: str, warmup: int, expected: list[float]) -> None:
    total = len(expected)
    got = [scheduled_lr(BASE, t, total, schedule=schedule, warmup=warmup) for t in range(1, total + 1)]
    assert got == pytest.approx([BASE * e for e in expected], rel=1e-12)
    assert all(lr > 0 for lr in got)  # no planned step is wasted on a zero learning rate


@pytest.mark.parametrize(
    ("step", "total", "kwargs", "pattern"),
    [
        (1, 4, {"schedule": "step"}, r"lr_schedule must be one of constant, linear, cosine, got 'step'"),
        (0, 4, {}, r"step must be in \[1, 4\], got 0"),
        (5, 4, {}, r"step must be in \[1, 4\], got 5"),
        (1, 4, {"warmup": -1}, r"warm-up steps must be in \[0, 4\).*got -1"),
        (1, 4, {"warmup": 4}, r"warm-up steps must be in \[0, 4\).*got 4"),
    ],
)
def test_scheduled_lr_refuses_bad_values(step: int, total: int, kwargs: dict[str, Any], pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        scheduled_lr(BASE, step, total, **kwargs)


def test_train_config_lr_at_indexes_the_whole_plan() -> None:
    # plan of 6 steps, linear after 2 warm-up steps: [1/2, 1, 1, 3/4, 1/2, 1/4]; this call runs plan steps 3..5
    config = TrainConfig(learning_rate=BASE, steps=3, plan_steps=6, plan_offset=2, lr_schedule="linear", warmup_steps=2)
    assert config.total_plan_steps == 6
    assert [config.lr_at(s) for s in (1, 2, 3)] == pytest.approx([BASE, 0.75 * BASE, 0.5 * BASE])
    # without plan_steps the plan is this call alone
    alone = TrainConfig(learning_rate=BASE, steps=4, lr_schedule="linear")
    assert [alone.lr_at(s) for s in range(1, 5)] == pytest.approx([BASE, 0.75 * BASE, 0.5 * BASE, 0.25 * BASE])


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"lr_schedule": "exponential"}, r"lr_schedule must be one of constant, linear, cosine, got 'exponential'"),
        ({"steps": 4, "warmup_steps": 4}, r"warmup_steps must be < the plan's 4 steps, got 4"),
        ({"steps": 2, "plan_steps": 6, "warmup_steps": 7}, r"warmup_steps must be < the plan's 6 steps, got 7"),
        ({"warmup_steps": -1}, r"warmup_steps must be an integer >= 0, got -1"),
        ({"steps": 3, "plan_steps": 6, "plan_offset": 4}, r"plan_offset \+ steps = 7 exceeds plan_steps = 6"),
        ({"plan_offset": -2}, r"plan_offset must be an integer >= 0, got -2"),
        ({"plan_steps": 0}, r"plan_steps must be an integer >= 1, got 0"),
        ({"plan_steps": -3}, r"plan_steps must be an integer >= 1, got -3"),
        ({"optimizer": "adam"}, r"optimizer must be one of adamw, sgd, adambc, got 'adam'"),
    ],
)
def test_train_config_refuses_bad_schedules(kwargs: dict[str, Any], pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        TrainConfig(**kwargs)


def test_a_client_round_runs_its_slice_of_the_plan() -> None:
    """Round r of a client with s steps per round runs plan steps (r - 1) s + 1 .. r s of one schedule."""
    config = RunConfig(
        rounds=3,
        learning_rate=BASE,
        lr_schedule="cosine",
        warmup_fraction=0.25,
        optimizer="sgd",
        momentum=0.5,
        weight_decay=0.01,
    )
    steps = 4
    plan = [scheduled_lr(BASE, t, 12, schedule="cosine", warmup=3) for t in range(1, 13)]
    got: list[float] = []
    for server_round in (1, 2, 3):
        settings = optimizer_settings(config, steps, server_round)
        assert settings["plan_steps"] == 12 and settings["warmup_steps"] == 3
        assert settings["plan_offset"] == (server_round - 1) * steps
        assert (settings["optimizer"], settings["momentum"], settings["weight_decay"]) == ("sgd", 0.5, 0.01)
        train_config = TrainConfig(steps=steps, **settings)
        got += [train_config.lr_at(s) for s in range(1, steps + 1)]
    assert got == pytest.approx(plan, rel=1e-12)
    # hand check of the slice boundaries: warm-up 1/3, 2/3, then the peak at plan step 4 (round 1's last)
    assert got[:4] == pytest.approx([BASE / 3, 2 * BASE / 3, BASE, BASE])
    assert got[4] == pytest.approx(BASE * 0.5 * (1 + math.cos(math.pi / 9)))
    # a round past the plan (the server asked for more rounds than planned) reuses the last slice
    assert optimizer_settings(config, steps, 4)["plan_offset"] == 8
    # warm-up is a whole number of steps, rounded down
    assert optimizer_settings(config.replace(warmup_fraction=0.3), steps, 1)["warmup_steps"] == 3


# ---------------------------------------------------------------- RunConfig


@pytest.mark.parametrize(
    ("changes", "error", "pattern"),
    [
        ({"optimizer": "adam"}, ValueError, r"optimizer must be one of adamw, sgd, adambc, got 'adam'"),
        ({"momentum": 1.0}, ValueError, r"momentum must be a number in \[0, 1\), got 1\.0"),
        ({"momentum": -0.1}, ValueError, r"momentum.*-0\.1"),
        ({"weight_decay": -0.01}, ValueError, r"weight_decay must be a finite number >= 0, got -0\.01"),
        ({"weight_decay": math.nan}, ValueError, r"weight_decay.*nan"),
        ({"lr_schedule": "step"}, ValueError, r"lr_schedule must be one of constant, linear, cosine, got 'step'"),
        ({"warmup_fraction": 1.0}, ValueError, r"warmup_fraction must be a number in \[0, 1\), got 1\.0"),
        ({"stateful_clients": "yes"}, TypeError, r"stateful_clients must be true or false, got 'yes'"),
        ({"ffa_lora": 1}, TypeError, r"ffa_lora must be true or false, got 1"),
    ],
)
def test_run_config_refuses_bad_optimizer_settings(
    changes: dict[str, Any], error: type[Exception], pattern: str
) -> None:
    with pytest.raises(error, match=pattern):
        RunConfig(**changes)


def test_run_config_new_fields_round_trip() -> None:
    config = RunConfig(
        optimizer="adambc",
        momentum=0.9,
        weight_decay=0.01,
        stateful_clients=True,
        lr_schedule="cosine",
        warmup_fraction=0.1,
        ffa_lora=True,
    )
    flower = config.to_flower()
    assert (flower["optimizer"], flower["stateful-clients"], flower["lr-schedule"], flower["ffa-lora"]) == (
        "adambc",
        True,
        "cosine",
        True,
    )
    assert RunConfig.from_flower(flower) == config
    assert RunConfig.from_dict(config.to_dict()) == config
    # Flower may hand whole numbers back as ints: they become the float fields again
    back = RunConfig.from_flower({**flower, "weight-decay": 0, "warmup-fraction": 0, "momentum": 0})
    assert (back.weight_decay, back.warmup_fraction, back.momentum) == (0.0, 0.0, 0.0)
    assert isinstance(back.weight_decay, float) and isinstance(back.warmup_fraction, float)
    assert RunConfig.from_flower(RunConfig().to_flower()) == RunConfig()


# ---------------------------------------------------------------- DP-AdamBC against numpy


def adambc_reference(
    theta: np.ndarray,
    grads: list[np.ndarray],
    lrs: list[float],
    phi: float,
    betas: tuple[float, float] = (0.9, 0.999),
    gamma: float = 5e-8,
    weight_decay: float = 0.0,
) -> np.ndarray:
    """arXiv 2312.14334, Algorithm 1 with decoupled weight decay, in float64."""
    b1, b2 = betas
    theta = theta.astype(np.float64).copy()
    m = np.zeros_like(theta)
    v = np.zeros_like(theta)
    for t, (g, lr) in enumerate(zip(grads, lrs, strict=True), start=1):
        g = g.astype(np.float64)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat = m / (1 - b1**t)
        v_hat = v / (1 - b2**t)
        theta = theta * (1 - lr * weight_decay) - lr * m_hat / np.sqrt(np.maximum(v_hat - phi, gamma))
    return theta


def _run_torch(
    optimizer_factory: Any, theta: np.ndarray, grads: list[np.ndarray], lrs: list[float] | None = None
) -> tuple[np.ndarray, torch.optim.Optimizer]:
    param = nn.Parameter(torch.tensor(theta, dtype=torch.float32))
    opt = optimizer_factory([param])
    for i, g in enumerate(grads):
        if lrs is not None:
            set_lr(opt, lrs[i])
        param.grad = torch.tensor(g, dtype=torch.float32)
        opt.step()
    return param.detach().numpy().astype(np.float64), opt


def _gradients(steps: int, seed: int = 0) -> tuple[np.ndarray, list[np.ndarray]]:
    """A 6x4 tensor whose columns have gradient scales 1e-3, 0.05, 0.3 and 2 (a common mean plus noise)."""
    rng = np.random.default_rng(seed)
    scale = np.array([1e-3, 0.05, 0.3, 2.0])
    theta = rng.normal(size=(6, 4))
    mean = rng.normal(size=(6, 4)) * scale
    return theta, [mean + rng.normal(size=(6, 4)) * scale for _ in range(steps)]


@pytest.mark.parametrize("steps", [1, 7])
def test_dp_adambc_equals_the_formula(steps: int) -> None:
    phi, lr, decay = 0.01, 1e-2, 0.05
    theta, grads = _gradients(steps)
    lrs = [lr * (1 + 0.1 * i) for i in range(steps)]  # a learning rate that changes (a schedule) is read each step
    got, opt = _run_torch(lambda p: DPAdamBC(p, lr=lr, noise_variance=phi, weight_decay=decay), theta, grads, lrs)
    expected = adambc_reference(theta, grads, lrs, phi, weight_decay=decay)
    np.testing.assert_allclose(got, expected, rtol=2e-5, atol=1e-7)
    # the test exercises both branches of the max: floored coordinates and corrected ones
    v_hat = sum((1 - 0.999) * 0.999 ** (steps - t) * g**2 for t, g in enumerate(grads, 1)) / (1 - 0.999**steps)
    assert (v_hat - phi < 5e-8).any() and (v_hat - phi > 5e-8).any()
    state = next(iter(opt.state.values()))
    assert float(state["step"]) == steps


def test_dp_adambc_without_noise_is_adamw_up_to_the_floor() -> None:
    """With Phi = 0 DP-AdamBC is AdamW except for the denominator: AdamW divides by
    sqrt(v_hat) + eps (eps = 1e-8), DP-AdamBC by sqrt(max(v_hat, gamma)) (gamma = 5e-8, a floor of
    2.2e-4 on the denominator). Where |g| >> 2.2e-4 the two agree to ~1e-8 relative; for tinier
    gradients AdamW still takes a near-sign step of size lr while DP-AdamBC's step shrinks."""
    rng = np.random.default_rng(1)
    theta = rng.normal(size=(5, 3))
    grads = [rng.normal(size=(5, 3)) for _ in range(5)]
    lr, decay = 1e-2, 0.1
    bc, _ = _run_torch(lambda p: DPAdamBC(p, lr=lr, noise_variance=0.0, weight_decay=decay), theta, grads)
    adamw, _ = _run_torch(lambda p: torch.optim.AdamW(p, lr=lr, weight_decay=decay), theta, grads)
    np.testing.assert_allclose(bc, adamw, rtol=1e-6, atol=1e-7)
    assert np.abs(bc - theta).max() > 1e-2  # they did move (5 steps of about lr each)

    # the documented difference: a constant gradient of 1e-5
    tiny = [np.full((2,), 1e-5)]
    zero = np.zeros(2)
    bc_step = _run_torch(lambda p: DPAdamBC(p, lr=lr, noise_variance=0.0), zero, tiny)[0]
    adamw_step = _run_torch(lambda p: torch.optim.AdamW(p, lr=lr, weight_decay=0.0), zero, tiny)[0]
    np.testing.assert_allclose(adamw_step, -lr * 1e-5 / (1e-5 + 1e-8), rtol=1e-5)  # ~ -lr
    np.testing.assert_allclose(bc_step, -lr * 1e-5 / math.sqrt(5e-8), rtol=1e-5)  # ~ -0.045 lr


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"lr": 0.0}, r"lr must be a finite number > 0, got 0\.0"),
        ({"lr": math.inf}, r"lr must be a finite number > 0, got inf"),
        ({"noise_variance": -1.0}, r"noise_variance must be a finite number >= 0, got -1\.0"),
        ({"noise_variance": math.nan}, r"noise_variance.*nan"),
        ({"betas": (0.9, 1.0)}, r"betas must be in \[0, 1\), got \(0\.9, 1\.0\)"),
        ({"gamma": 0.0}, r"gamma must be > 0, got 0\.0"),
        ({"weight_decay": -0.1}, r"weight_decay must be >= 0, got -0\.1"),
    ],
)
def test_dp_adambc_refuses_bad_settings(kwargs: dict[str, Any], pattern: str) -> None:
    settings = {"lr": 1e-3, "noise_variance": 0.0, **kwargs}
    with pytest.raises(ValueError, match=pattern):
        DPAdamBC([nn.Parameter(torch.zeros(2))], **settings)


def test_make_optimizer_by_name() -> None:
    params = [nn.Parameter(torch.zeros(3))]
    adamw = make_optimizer(params, "adamw", 0.1, weight_decay=0.2)
    assert type(adamw) is torch.optim.AdamW and adamw.param_groups[0]["weight_decay"] == 0.2
    sgd = make_optimizer(params, "sgd", 0.1, momentum=0.9, weight_decay=0.2)
    assert type(sgd) is torch.optim.SGD and sgd.param_groups[0]["momentum"] == 0.9
    bc = make_optimizer(params, "adambc", 0.1, noise_variance=0.25, weight_decay=0.2)
    assert isinstance(bc, DPAdamBC)
    assert (bc.param_groups[0]["noise_variance"], bc.param_groups[0]["weight_decay"]) == (0.25, 0.2)
    with pytest.raises(ValueError, match=r"optimizer must be one of adamw, sgd, adambc, got 'lamb'"):
        make_optimizer(params, "lamb", 0.1)
    set_lr(bc, 0.5)
    assert bc.param_groups[0]["lr"] == 0.5


def test_train_config_gives_dp_adambc_the_noise_variance() -> None:
    params = [nn.Parameter(torch.zeros(3))]
    private = TrainConfig(optimizer="adambc", noise_multiplier=1.5, max_grad_norm=0.5, batch_size=8)
    opt = train_module.make_optimizer(params, private)
    assert isinstance(opt, DPAdamBC)
    assert opt.param_groups[0]["noise_variance"] == pytest.approx((1.5 * 0.5 / 8) ** 2, rel=1e-15)
    plain = TrainConfig(optimizer="adambc", batch_size=8)
    assert train_module.make_optimizer(params, plain).param_groups[0]["noise_variance"] == 0.0
    clip_only = TrainConfig(optimizer="adambc", noise_multiplier=0.0, batch_size=8)
    assert train_module.make_optimizer(params, clip_only).param_groups[0]["noise_variance"] == 0.0


# ---------------------------------------------------------------- on the real model


@pytest.fixture(scope="module")
def tiny(glue_dir: Path) -> dict[str, Any]:
    from fedtune.batching import pack_dataset
    from fedtune.data.glue import load_glue
    from fedtune.data.tokenize import tokenize_dataset

    base, tokenizer = load_model_and_tokenizer(None, 2, seed=0)
    for module in base.modules():  # deterministic gradients
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    data = load_glue("sst2", glue_dir, seed=0, max_train_examples=48, max_eval_examples=8)
    train = pack_dataset(tokenize_dataset(data.train, tokenizer, data.spec, max_length=32), tokenizer)
    return {"model": build_peft_model(base, LoraSettings(rank=4), seed=0), "train": train}


@pytest.fixture
def recorded_steps(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[dict[str, Any]]]:
    """Record, at every optimizer step of train_local, the learning rate used and, for plain SGD, the
    largest deviation of the parameter change from -lr * grad."""
    records: list[dict[str, Any]] = []
    original = train_module.make_optimizer

    def recording(params: Any, config: TrainConfig) -> torch.optim.Optimizer:
        opt = original(params, config)

        def before(optimizer: torch.optim.Optimizer, *_: Any) -> None:
            ps = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            records.append(
                {
                    "lr": optimizer.param_groups[0]["lr"],
                    "params": [p.detach().clone() for p in ps],
                    "grads": [p.grad.detach().clone() for p in ps],  # type: ignore[union-attr]
                    "live": ps,
                }
            )

        def after(optimizer: torch.optim.Optimizer, *_: Any) -> None:
            r = records[-1]
            r["deviation"] = max(
                float((p.detach() - (old - r["lr"] * g)).abs().max())
                for p, old, g in zip(r.pop("live"), r.pop("params"), r.pop("grads"), strict=True)
            )

        opt.register_step_pre_hook(before)
        opt.register_step_post_hook(after)
        return opt

    monkeypatch.setattr(train_module, "make_optimizer", recording)
    yield records


@pytest.mark.parametrize("private", [False, True])
def test_train_local_applies_the_schedule_at_every_step(
    tiny: dict[str, Any], recorded_steps: list[dict[str, Any]], private: bool
) -> None:
    """Round 2 of a 3-round plan of 3 steps each (cosine, 2 warm-up steps): plain SGD's parameter change
    at each step is exactly -lr_t * grad with lr_t the schedule's plan steps 4, 5, 6."""
    config = TrainConfig(
        batch_size=8,
        steps=3,
        learning_rate=0.05,
        optimizer="sgd",
        lr_schedule="cosine",
        warmup_steps=2,
        plan_steps=9,
        plan_offset=3,
        seed=1,
        noise_multiplier=0.5 if private else None,
        dp_randomness="seeded",
    )
    result = train_local(tiny["model"], tiny["train"], None, config, CPU)
    expected = [scheduled_lr(0.05, t, 9, schedule="cosine", warmup=2) for t in (4, 5, 6)]
    # by hand: (1 + cos(pi k / 7)) / 2 for k = 1, 2, 3
    assert expected == pytest.approx([0.05 * 0.5 * (1 + math.cos(math.pi * k / 7)) for k in (1, 2, 3)])
    assert [r["lr"] for r in recorded_steps] == pytest.approx(expected, rel=1e-12)
    assert all(r["deviation"] < 1e-6 for r in recorded_steps)
    assert result.steps == 3 and math.isfinite(result.mean_loss)


def test_train_local_constant_schedule_keeps_the_base_rate(
    tiny: dict[str, Any], recorded_steps: list[dict[str, Any]]
) -> None:
    config = TrainConfig(batch_size=8, steps=2, learning_rate=0.03, optimizer="sgd", seed=1)
    train_local(tiny["model"], tiny["train"], None, config, CPU)
    assert [r["lr"] for r in recorded_steps] == [0.03, 0.03]


def test_dp_train_local_with_dp_adambc_trains(tiny: dict[str, Any]) -> None:
    model = copy.deepcopy(tiny["model"])
    before = get_trainable_state(model)
    config = TrainConfig(
        batch_size=8,
        steps=3,
        optimizer="adambc",
        learning_rate=1e-3,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        seed=2,
        dp_randomness="seeded",
    )
    result = train_local(model, tiny["train"], None, config, CPU, in_place=True)
    assert math.isfinite(result.mean_loss) and result.steps == 3
    assert all(bool(torch.isfinite(v).all()) for v in result.state.values())
    changed = [k for k in before if not torch.equal(before[k], result.state[k])]
    assert changed and set(changed) == set(before)  # noise reaches every trainable tensor
    assert result.optimizer_state is not None and result.optimizer_state["fedtune_optimizer"] == "adambc"
    steps = {float(s["step"]) for s in result.optimizer_state["state"].values()}
    assert steps == {3.0}
    phi = result.optimizer_state["param_groups"][0]["noise_variance"]
    assert phi == pytest.approx((1.0 * 1.0 / 8) ** 2)
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())  # Opacus detached
