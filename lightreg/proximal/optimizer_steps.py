"""The step each torch optimizer takes, read from the state its step just wrote (the table: ``lightreg.proximal.metric``).

Each ``_<name>_rule(optimizer, group)`` returns ``param -> metric``: an :class:`~lightreg.proximal.adaptive_step.AdaptiveStep`
``numerator / (sqrt(v) / divisor + eps)`` for the adaptive optimizers (bounded where ``v = 0`` when evaluated), a
float for ASGD and RAdam's unrectified steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from lightreg.proximal.adaptive_step import AdaptiveStep, adaptive_step
from lightreg.proximal.step_registry import MetricRule

Metric = Any


def _count(state: dict[str, Any]) -> float | Tensor:
    """The optimizer's step count: a float, or a 0-d tensor when it lives on an accelerator (capturable, fused).

    Reading a CPU tensor is no device sync; a device one stays a tensor so no sync is needed at all.
    """
    step = state["step"]
    if isinstance(step, Tensor) and step.device.type != "cpu":
        return step
    return float(step)


def _sqrt(x: float | Tensor) -> float | Tensor:
    return x.sqrt() if isinstance(x, Tensor) else math.sqrt(x)


def _adam_rule(optimizer: torch.optim.Optimizer, group: dict[str, Any]) -> MetricRule:
    lr, beta2, eps = float(group["lr"]), float(group["betas"][1]), float(group["eps"])
    key = "max_exp_avg_sq" if group.get("amsgrad", False) else "exp_avg_sq"

    def rule(p: Tensor) -> Metric:
        state = optimizer.state[p]
        return adaptive_step(lr, state[key], _sqrt(1 - beta2 ** _count(state)), eps, lr)

    return rule


def _nadam_rule(optimizer: torch.optim.Optimizer, group: dict[str, Any]) -> MetricRule:
    lr, (beta1, beta2), eps = float(group["lr"]), (float(b) for b in group["betas"]), float(group["eps"])
    psi = float(group["momentum_decay"])

    def rule(p: Tensor) -> Metric:
        state = optimizer.state[p]
        step = _count(state)
        mu_product = _count({"step": state["mu_product"]})
        mu, mu_next = (beta1 * (1.0 - 0.5 * 0.96 ** (k * psi)) for k in (step, step + 1))
        # On a constant gradient g (so exp_avg -> g) NAdam moves by lr * c * g / denom: c is part of its step.
        c = (1.0 - mu) / (1.0 - mu_product) + mu_next / (1.0 - mu_product * mu_next)
        return adaptive_step(lr * c, state["exp_avg_sq"], _sqrt(1 - beta2**step), eps, lr)

    return rule


def _radam_rule(optimizer: torch.optim.Optimizer, group: dict[str, Any]) -> MetricRule:
    lr, beta2, eps = float(group["lr"]), float(group["betas"][1]), float(group["eps"])
    rho_inf = 2 / (1 - beta2) - 1

    def rule(p: Tensor) -> Metric:
        state = optimizer.state[p]
        step = _count(state)
        bias_correction2 = 1 - beta2**step
        rho_t = rho_inf - 2 * step * beta2**step / bias_correction2
        if not isinstance(rho_t, Tensor) and rho_t <= 5.0:
            return lr  # an unrectified step is lr * m_hat: momentum SGD with step lr
        rect = _sqrt((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t))
        numerator = lr * rect * _sqrt(bias_correction2)
        if isinstance(rho_t, Tensor):  # a device step count: the unrectified case without a host read
            return _RAdamDevice(adaptive_step(numerator, state["exp_avg_sq"], 1.0, eps, lr), rho_t <= 5.0, lr)
        return adaptive_step(numerator, state["exp_avg_sq"], 1.0, eps, lr)

    return rule


class _RAdamDevice(NamedTuple):
    """RAdam with its step count on the device: the rectified step, or ``lr`` where ``rho_t <= 5``."""

    step: AdaptiveStep
    unrectified: Tensor
    lr: float

    def bounded(self) -> Tensor:
        return self.step.bounded().masked_fill_(self.unrectified, self.lr)

    def unbounded(self) -> Tensor:
        return self.step.unbounded().masked_fill_(self.unrectified, self.lr)


def _rmsprop_rule(optimizer: torch.optim.Optimizer, group: dict[str, Any]) -> MetricRule:
    lr, eps, momentum = float(group["lr"]), float(group["eps"]), float(group["momentum"])
    centered = group["centered"]

    def rule(p: Tensor) -> Metric:
        state = optimizer.state[p]
        avg = state["square_avg"]
        if centered:
            avg = avg.addcmul(state["grad_avg"], state["grad_avg"], value=-1)
        return adaptive_step(lr / (1.0 - momentum), avg, 1.0, eps, lr / (1.0 - momentum))

    return rule


def _adagrad_rule(optimizer: torch.optim.Optimizer, group: dict[str, Any]) -> MetricRule:
    lr, eps, lr_decay = float(group["lr"]), float(group["eps"]), float(group["lr_decay"])

    def rule(p: Tensor) -> Metric:
        state = optimizer.state[p]
        clr = lr / (1 + (_count(state) - 1) * lr_decay)
        return adaptive_step(clr, state["sum"], 1.0, eps, lr)

    return rule


def _sparse_adam_rule(optimizer: torch.optim.Optimizer, group: dict[str, Any]) -> MetricRule:
    lr, beta2, eps = float(group["lr"]), float(group["betas"][1]), float(group["eps"])

    def rule(p: Tensor) -> Metric:
        # SparseAdam moves a row by lr sqrt(1 - beta2^k) m_hat / (sqrt(v) + eps): eps is added to sqrt(v), not sqrt(v_hat).
        state = optimizer.state[p]
        return adaptive_step(lr * _sqrt(1 - beta2 ** _count(state)), state["exp_avg_sq"], 1.0, eps, lr)

    return rule


def _asgd_rule(optimizer: torch.optim.Optimizer, group: dict[str, Any]) -> MetricRule:
    lr, lambd, alpha = float(group["lr"]), float(group["lambd"]), float(group["alpha"])

    def rule(p: Tensor) -> Metric:
        # state["eta"] already holds the NEXT step's eta; the step just taken used the one before it.
        return lr / ((1 + lambd * lr * (_count(optimizer.state[p]) - 1)) ** alpha)

    return rule


RULES: dict[type, Callable[[torch.optim.Optimizer, dict[str, Any]], MetricRule]] = {
    torch.optim.Adam: _adam_rule,
    torch.optim.AdamW: _adam_rule,
    torch.optim.NAdam: _nadam_rule,
    torch.optim.RAdam: _radam_rule,
    torch.optim.RMSprop: _rmsprop_rule,
    torch.optim.Adagrad: _adagrad_rule,
    torch.optim.SparseAdam: _sparse_adam_rule,
}
#: Optimizers whose step is one number per parameter, known by name: no per-coordinate metric, no warning.
SCALAR_RULES: dict[type, Callable[[torch.optim.Optimizer, dict[str, Any]], MetricRule]] = {
    torch.optim.ASGD: _asgd_rule,
}
