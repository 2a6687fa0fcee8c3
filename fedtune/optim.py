"""Client optimizers and the learning-rate schedule over a whole training plan.

* :func:`make_optimizer`: SGD (with momentum), AdamW, or DP-AdamBC (:class:`DPAdamBC`).
* :func:`scheduled_lr`: linear warm-up, then constant, linear or cosine decay, indexed by the step
  of the *whole plan* (a federated client's step ``t`` of round ``r`` is plan step
  ``(r - 1) * steps_per_round + t``), so the schedule runs once over all rounds, not once per round.

All of them only post-process the privatized gradient that Opacus' ``DPOptimizer`` hands to the
wrapped optimizer, so none changes the privacy guarantee.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import torch
from torch import nn

from fedtune.config import OPTIMIZERS, SCHEDULES

__all__ = [
    "OPTIMIZERS",
    "SCHEDULES",
    "DPAdamBC",
    "OptimizerName",
    "ScheduleName",
    "make_optimizer",
    "scheduled_lr",
    "set_lr",
]

OptimizerName = Literal["adamw", "sgd", "adambc"]
ScheduleName = Literal["constant", "linear", "cosine"]


class DPAdamBC(torch.optim.Optimizer):
    r"""Adam with the DP noise variance removed from the second moment (DP-AdamBC).

    Under DP-SGD the gradient Adam sees is :math:`\tilde g = \bar g + z`, with
    :math:`z \sim \mathcal N(0, \Phi I)` and :math:`\Phi = (\sigma C / B)^2` (noise multiplier
    :math:`\sigma`, clipping norm :math:`C`, expected batch :math:`B`). Adam's second moment then
    estimates :math:`\bar g^2 + \Phi`, and where :math:`\Phi` dominates, Adam divides by the noise
    scale: it becomes sign-free SGD with step :math:`\eta / \sqrt{\Phi}` and its per-coordinate
    adaptivity is lost. DP-AdamBC subtracts the known :math:`\Phi` (Tang et al., "DP-AdamBC: Your
    DP-Adam Is Actually DP-SGD (Unless You Apply Bias Correction)", AAAI 2024, arXiv 2312.14334):

    .. math::

        m_t = \beta_1 m_{t-1} + (1-\beta_1)\tilde g_t,\quad
        v_t = \beta_2 v_{t-1} + (1-\beta_2)\tilde g_t^2,

        \hat m_t = \frac{m_t}{1-\beta_1^t},\quad \hat v_t = \frac{v_t}{1-\beta_2^t},\quad
        \theta_t = \theta_{t-1}(1 - \eta\lambda) - \eta\,\frac{\hat m_t}{\sqrt{\max(\hat v_t - \Phi, \gamma)}}.

    Parameters
    ----------
    params : iterable of torch.nn.Parameter
    lr : float
        :math:`\eta > 0`.
    noise_variance : float
        :math:`\Phi \ge 0` per coordinate of the averaged gradient; 0 gives AdamW with the
        :math:`\gamma` floor in place of Adam's epsilon.
    betas : tuple of float
        :math:`(\beta_1, \beta_2)`, each in [0, 1).
    gamma : float
        Floor :math:`\gamma > 0` of the corrected second moment (the paper's :math:`\epsilon'`;
        5e-8 as in its experiments).
    weight_decay : float
        Decoupled weight decay :math:`\lambda \ge 0`.
    """

    def __init__(
        self,
        params: Iterable[nn.Parameter],
        lr: float,
        noise_variance: float,
        betas: tuple[float, float] = (0.9, 0.999),
        gamma: float = 5e-8,
        weight_decay: float = 0.0,
    ) -> None:
        if not lr > 0 or not math.isfinite(lr):
            raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
        if not noise_variance >= 0 or not math.isfinite(noise_variance):
            raise ValueError(f"noise_variance must be a finite number >= 0, got {noise_variance!r}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be in [0, 1), got {betas!r}")
        if not gamma > 0:
            raise ValueError(f"gamma must be > 0, got {gamma!r}")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
        defaults = {
            "lr": lr,
            "noise_variance": noise_variance,
            "betas": betas,
            "gamma": gamma,
            "weight_decay": weight_decay,
        }
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # noqa: D102 - torch's API
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, phi, gamma, decay = group["lr"], group["noise_variance"], group["gamma"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                t = float(state["step"])
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                m_hat = exp_avg / (1 - beta1**t)
                v_hat = exp_avg_sq / (1 - beta2**t)
                denom = (v_hat - phi).clamp_(min=gamma).sqrt_()
                if decay:
                    p.mul_(1 - lr * decay)
                p.addcdiv_(m_hat, denom, value=-lr)
        return loss


def make_optimizer(
    params: Sequence[nn.Parameter],
    name: str,
    learning_rate: float,
    *,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    noise_variance: float = 0.0,
) -> torch.optim.Optimizer:
    """The client optimizer ``name`` (see :data:`OPTIMIZERS`) over ``params``.

    ``noise_variance`` is DP-AdamBC's :math:`\\Phi = (\\sigma C / B)^2`; the other optimizers ignore it.
    ``momentum`` applies to SGD only (heavy ball, no dampening, as ``torch.optim.SGD``).
    """
    if name == "adamw":
        return torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=learning_rate, momentum=momentum, weight_decay=weight_decay)
    if name == "adambc":
        return DPAdamBC(params, lr=learning_rate, noise_variance=noise_variance, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}")


def scheduled_lr(base: float, step: int, total: int, *, schedule: str = "constant", warmup: int = 0) -> float:
    r"""Learning rate of plan step ``step`` (1-based) out of ``total``.

    .. math::

        \eta_t = \begin{cases}
            \eta\, t / W & t \le W \text{ (warm-up)}\\
            \eta & \text{constant}\\
            \eta\,(T - t + 1) / (T - W) & \text{linear: the last step still moves}\\
            \eta\,\tfrac12\bigl(1 + \cos(\pi (t - W - 1) / (T - W))\bigr) & \text{cosine}
        \end{cases}

    with warm-up ``W`` steps and ``T = total``. Both decays end one step short of 0, so no
    planned step (and no privacy spent on it) is wasted on a zero learning rate.

    Raises
    ------
    ValueError
        Step outside [1, total], a warm-up outside [0, total) (the peak would never be reached),
        or an unknown schedule.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    if not 1 <= step <= total:
        raise ValueError(f"step must be in [1, {total}], got {step!r}")
    if not 0 <= warmup < total:
        raise ValueError(f"warm-up steps must be in [0, {total}) (the plan's steps), got {warmup!r}")
    if step <= warmup:
        return base * step / warmup
    if schedule == "constant":
        return base
    span = total - warmup
    done = step - warmup - 1  # 0 at the first step after warm-up
    if schedule == "linear":
        return base * (span - done) / span
    return base * 0.5 * (1.0 + math.cos(math.pi * done / span))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every parameter group's learning rate (an Opacus DPOptimizer shares its groups)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
