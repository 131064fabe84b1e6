"""The step an optimizer really took, per coordinate: the metric of the proximal step (ProxGen).

After an adaptive optimizer's step ``w <- w - t ⊙ d`` (``d`` its gradient estimate), the proximal step
of a penalty must use the same per-coordinate step ``t``: ``argmin_v R(v) + Σ_i (v_i - u_i)² / (2 t_i)``.
Then a fixed point of "optimizer step, then prox" satisfies ``0 ∈ ∇f(w) + ∂R(w)``: the stationary points
of ``loss + R`` whatever the metric (Yun, Lozano & Yang, NeurIPS 2021). With the plain ``lr`` instead, the
fixed points of Adam + prox are not stationary points of ``loss + R``.

The step of each supported optimizer, read from the state it just wrote (``v̂ = v / (1 - beta2^step)``,
``step`` the count after this step):

=============  ===========================================================================================
Adam, AdamW    ``lr / (sqrt(v̂) + eps)``, ``v = exp_avg_sq`` (``max_exp_avg_sq`` with ``amsgrad``)
NAdam          ``lr * c / (sqrt(v̂) + eps)``, ``c = (1 - mu_t) / (1 - Π_t) + mu_{t+1} / (1 - Π_{t+1})`` its two
               momentum coefficients, whose sum multiplies a constant gradient (-> 1 as the step count grows)
RAdam          ``lr * rect * sqrt(1 - beta2^step) / (sqrt(exp_avg_sq) + eps)`` on rectified steps
               (``rho_t > 5``); plain ``lr`` on the others, which are momentum-SGD steps
RMSprop        ``lr / ((sqrt(square_avg - grad_avg²) + eps) * (1 - momentum))`` (``grad_avg = 0`` unless
               ``centered``): with momentum the buffer settles at ``g / (avg * (1 - momentum))``
Adagrad        ``clr / (sqrt(sum) + eps)``, ``clr = lr / (1 + (step - 1) * lr_decay)``
SGD            ``lr * (1 - dampening) / (1 - momentum)`` (a float): the momentum buffer settles at
               ``(1 - dampening) * g / (1 - momentum)``, so with the plain ``lr`` the fixed points would be
               those of ``loss + (1 - momentum) * R``; nesterov settles at the same step
any other      ``lr`` (a float)
=============  ===========================================================================================

The optimizer's own ``weight_decay`` (coupled or decoupled) and ``maximize`` do not change the metric;
``foreach``, ``fused`` and ``capturable`` keep the same state (``capturable``/``fused`` keep ``step`` on the
parameter's device, and the bias correction is then a 0-d device tensor: no host sync).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from lightreg.binding import unwrap
from lightreg.distributed import local_tensor
from lightreg.penalty import Step

#: A function ``param -> step`` for the parameters of one param group (one float or one tensor each).
StepRule = Callable[[Tensor], Step]

#: Optimizer state names that mark a per-coordinate adaptive step lightreg does not know.
ADAPTIVE_STATE = ("exp_avg_sq", "max_exp_avg_sq", "square_avg", "sum", "exp_inf", "acc_delta", "step_size",
                  "row_var", "col_var", "variance")

FORMULAS = {
    "Adam": "lr / (sqrt(v_hat) + eps), v_hat = exp_avg_sq / (1 - beta2^step)",
    "AdamW": "lr / (sqrt(v_hat) + eps), v_hat = exp_avg_sq / (1 - beta2^step)",
    "NAdam": "lr * c / (sqrt(v_hat) + eps), c = (1 - mu_t) / (1 - prod mu) + mu_t+1 / (1 - prod mu * mu_t+1)",
    "RAdam": "lr * rect * sqrt(1 - beta2^step) / (sqrt(exp_avg_sq) + eps) when rectified, else lr",
    "RMSprop": "lr / ((sqrt(square_avg - grad_avg^2) + eps) * (1 - momentum))",
    "Adagrad": "lr / (1 + (step - 1) * lr_decay) / (sqrt(sum) + eps)",
}


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


def _over(numerator: float | Tensor, denominator: Tensor) -> Tensor:
    """``numerator / denominator`` written into ``denominator`` (the one temporary)."""
    return denominator.reciprocal_().mul_(numerator)


def _adam_rule(optimizer: torch.optim.Optimizer, group: dict[str, Any]) -> StepRule:
    lr, beta2, eps = float(group["lr"]), float(group["betas"][1]), float(group["eps"])
    key = "max_exp_avg_sq" if group.get("amsgrad", False) else "exp_avg_sq"

    def rule(p: Tensor) -> Step:
        state = optimizer.state[p]
        step = _count(state)
        denom = local_tensor(state[key]).sqrt().div_(_sqrt(1 - beta2**step)).add_(eps)
        return _over(lr, denom)

    return rule


def _nadam_rule(optimizer: torch.optim.Optimizer, group: dict[str, Any]) -> StepRule:
    lr, (beta1, beta2), eps = float(group["lr"]), (float(b) for b in group["betas"]), float(group["eps"])
    psi = float(group["momentum_decay"])

    def rule(p: Tensor) -> Step:
        state = optimizer.state[p]
        step = _count(state)
        mu_product = _count({"step": state["mu_product"]})
        mu, mu_next = (beta1 * (1.0 - 0.5 * 0.96 ** (k * psi)) for k in (step, step + 1))
        # On a constant gradient g (so exp_avg -> g) NAdam moves by lr * c * g / denom: c is part of its step.
        c = (1.0 - mu) / (1.0 - mu_product) + mu_next / (1.0 - mu_product * mu_next)
        denom = local_tensor(state["exp_avg_sq"]).div(1 - beta2**step).sqrt_().add_(eps)
        return _over(lr * c, denom)

    return rule


def _radam_rule(optimizer: torch.optim.Optimizer, group: dict[str, Any]) -> StepRule:
    lr, beta2, eps = float(group["lr"]), float(group["betas"][1]), float(group["eps"])
    rho_inf = 2 / (1 - beta2) - 1

    def rule(p: Tensor) -> Step:
        state = optimizer.state[p]
        step = _count(state)
        bias_correction2 = 1 - beta2**step
        rho_t = rho_inf - 2 * step * beta2**step / bias_correction2
        if not isinstance(rho_t, Tensor) and rho_t <= 5.0:
            return lr  # an unrectified step is lr * m_hat: momentum SGD with step lr
        rect = _sqrt((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t))
        t = _over(lr * rect * _sqrt(bias_correction2), local_tensor(state["exp_avg_sq"]).sqrt().add_(eps))
        return t if not isinstance(rho_t, Tensor) else t.masked_fill_(rho_t <= 5.0, lr)

    return rule


def _rmsprop_rule(optimizer: torch.optim.Optimizer, group: dict[str, Any]) -> StepRule:
    lr, eps, momentum = float(group["lr"]), float(group["eps"]), float(group["momentum"])
    centered = group["centered"]

    def rule(p: Tensor) -> Step:
        state = optimizer.state[p]
        avg = local_tensor(state["square_avg"])
        if centered:
            grad_avg = local_tensor(state["grad_avg"])
            avg = avg.addcmul(grad_avg, grad_avg, value=-1).sqrt_()
        else:
            avg = avg.sqrt()
        return _over(lr / (1.0 - momentum), avg.add_(eps))

    return rule


def _adagrad_rule(optimizer: torch.optim.Optimizer, group: dict[str, Any]) -> StepRule:
    lr, eps, lr_decay = float(group["lr"]), float(group["eps"]), float(group["lr_decay"])

    def rule(p: Tensor) -> Step:
        state = optimizer.state[p]
        clr = lr / (1 + (_count(state) - 1) * lr_decay)
        return _over(clr, local_tensor(state["sum"]).sqrt().add_(eps))

    return rule


RULES: dict[type, Callable[[torch.optim.Optimizer, dict[str, Any]], StepRule]] = {
    torch.optim.Adam: _adam_rule,
    torch.optim.AdamW: _adam_rule,
    torch.optim.NAdam: _nadam_rule,
    torch.optim.RAdam: _radam_rule,
    torch.optim.RMSprop: _rmsprop_rule,
    torch.optim.Adagrad: _adagrad_rule,
}


def is_preconditioned(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer``'s class has a known per-coordinate step (exact class: a subclass may change it).

    Example:
        >>> p = torch.nn.Parameter(torch.zeros(1))
        >>> is_preconditioned(torch.optim.AdamW([p])), is_preconditioned(torch.optim.SGD([p], lr=0.1))
        (True, False)
    """
    return type(unwrap(optimizer)) in RULES


def step_formula(optimizer: torch.optim.Optimizer, preconditioned: bool = True) -> str:
    """The prox step ``optimizer`` gets, in words, for the fit-start report (``lr`` unless ``preconditioned``).

    Example:
        >>> step_formula(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1))
        'SGD: lr'
    """
    name = type(unwrap(optimizer)).__name__
    if preconditioned and is_preconditioned(optimizer):
        return f"{name}: {FORMULAS[name]}"
    momentum = preconditioned and name == "SGD" and any(g.get("momentum", 0.0) for g in unwrap(optimizer).param_groups)
    return f"{name}: {'lr * (1 - dampening) / (1 - momentum)' if momentum else 'lr'}"


def step_rule(optimizer: torch.optim.Optimizer, group: dict[str, Any]) -> StepRule:
    """``param -> t``: the step ``optimizer`` just took on each coordinate of a parameter of ``group``.

    A tensor shaped like the parameter (its local shard under FSDP2), or the float ``lr`` for optimizers
    without a known per-coordinate step and for a parameter the optimizer has no state for. Call it after
    ``optimizer.step()``; each call makes one temporary of the parameter's size.

    Example:
        >>> p = torch.nn.Parameter(torch.tensor([1.0, -2.0])); opt = torch.optim.Adam([p], lr=0.1)
        >>> p.grad = torch.tensor([0.5, 4.0]); opt.step()
        >>> step_rule(opt, opt.param_groups[0])(p)  # first step: v_hat = g², t = lr / (|g| + eps)
        tensor([0.2000, 0.0250])
    """
    optimizer = unwrap(optimizer)
    make = RULES.get(type(optimizer))
    lr = float(group["lr"])
    if make is None:
        return lambda p: lr
    rule = make(optimizer, group)
    return lambda p: rule(p) if optimizer.state.get(p) else lr


def scalar_step(optimizer: torch.optim.Optimizer, group: dict[str, Any]) -> float:
    """The one step every coordinate of ``group`` took, for optimizers without a per-coordinate one.

    SGD with momentum ``mu`` (and ``dampening``) moves a parameter by ``lr * (1 - dampening) / (1 - mu)`` per
    unit of a steady gradient; any other optimizer by ``lr``.

    Example:
        >>> p = torch.nn.Parameter(torch.zeros(1))
        >>> opt = torch.optim.SGD([p], lr=0.1, momentum=0.9)
        >>> round(scalar_step(opt, opt.param_groups[0]), 12)
        1.0
    """
    lr = float(group["lr"])
    if type(unwrap(optimizer)) is torch.optim.SGD and group.get("momentum", 0.0):
        return lr * (1.0 - float(group.get("dampening", 0.0))) / (1.0 - float(group["momentum"]))
    return lr


def unknown_adaptive_state(optimizer: torch.optim.Optimizer) -> list[str]:
    """The per-coordinate state names (``exp_avg_sq``...) of an optimizer whose step lightreg does not know.

    Empty for supported optimizers and for optimizers without such state (SGD). Look at it after a step.

    Example:
        >>> p = torch.nn.Parameter(torch.ones(1)); p.grad = torch.ones(1)
        >>> opt = torch.optim.Adamax([p]); opt.step(); unknown_adaptive_state(opt)
        ['exp_inf']
    """
    optimizer = unwrap(optimizer)
    if is_preconditioned(optimizer):
        return []
    keys = {k for state in optimizer.state.values() for k in state}
    return [k for k in ADAPTIVE_STATE if k in keys]


def warn_unknown_adaptive(optimizer: torch.optim.Optimizer, who: str, warn: Callable[[str], Any]) -> None:
    """Warn (through ``warn``) when ``optimizer`` keeps per-coordinate state whose step lightreg does not know."""
    keys = unknown_adaptive_state(optimizer)
    if keys:
        warn(f"{who}: {type(unwrap(optimizer)).__name__} keeps per-coordinate state {keys} but its step is not known "
             "to lightreg; the prox uses the plain lr (override Regularizer.prox_steps).")


class LazySteps(Sequence):
    """The steps of ``params`` under ``rule``, each computed when read and not kept.

    A list of per-coordinate steps would hold a temporary the size of the whole selection; this sequence
    holds none, so a loop over it keeps at most the current parameter's step alive.
    """

    def __init__(self, rule: StepRule, params: Sequence[Tensor]) -> None:
        self.rule, self.params = rule, params

    def __len__(self) -> int:
        return len(self.params)

    def __getitem__(self, i: int) -> Step:  # type: ignore[override]
        return self.rule(self.params[i])

    def __iter__(self) -> Iterator[Step]:
        return (self.rule(p) for p in self.params)
