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
SparseAdam     ``lr * sqrt(1 - beta2^step) / (sqrt(exp_avg_sq) + eps)`` (its eps is added to ``sqrt(v)``, not
               ``sqrt(v̂)``); rows a batch does not touch keep their state and their step
SGD            ``lr * (1 - dampening) / (1 - momentum)`` (a float): the momentum buffer settles at
               ``(1 - dampening) * g / (1 - momentum)``, so with the plain ``lr`` the fixed points would be
               those of ``loss + (1 - momentum) * R``; nesterov settles at the same step
ASGD           ``eta = lr / (1 + lambd * lr * (step - 1))^alpha`` (a float: the eta of the step just taken)
any other      ``lr`` (a float), with one warning naming the class; :func:`register_step_rule` gives its rule
=============  ===========================================================================================

A coordinate the optimizer has not stepped yet (``v = 0``), which would take ``lr / eps``, takes the tensor's
typical step instead, that of the mean ``v`` of its stepped coordinates (``lightreg.proximal.adaptive_step``). A step with
``lr = 0`` is 0. A Lookahead-style wrapper (``base_optimizer``/``optimizer`` attribute) is looked through to the optimizer that computes the step.

The optimizer's own ``weight_decay`` (coupled or decoupled) and ``maximize`` do not change the metric;
``foreach``, ``fused`` and ``capturable`` keep the same state (``capturable``/``fused`` keep ``step`` on the
parameter's device, and the bias correction is then a 0-d device tensor: no host sync).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from lightreg.proximal.optimizer_steps import RULES, SCALAR_RULES
from lightreg.penalties.contract import Step
from lightreg.proximal.step_registry import REGISTERED, MetricRule, base_optimizer, register_step_rule  # noqa: F401 (re-exported)

#: A function ``param -> step`` for the parameters of one param group (one float or one tensor each).
StepRule = Callable[[Tensor], Step]
#: What a rule returns before the bound: a float, a tensor, or an :class:`AdaptiveStep` (anything with ``bounded()``).
Metric = Any

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
    "SparseAdam": "lr * sqrt(1 - beta2^step) / (sqrt(exp_avg_sq) + eps)",
}


def _make(optimizer: torch.optim.Optimizer) -> Callable[[torch.optim.Optimizer, dict[str, Any]], MetricRule] | None:
    cls = type(optimizer)
    return REGISTERED.get(cls) or RULES.get(cls) or SCALAR_RULES.get(cls)


def is_known(optimizer: torch.optim.Optimizer) -> bool:
    """Whether lightreg knows ``optimizer``'s step by its class (built in, SGD, or registered): no warning.

    Example:
        >>> is_known(torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1))
        True
    """
    optimizer = base_optimizer(optimizer)
    return type(optimizer) is torch.optim.SGD or _make(optimizer) is not None


def is_preconditioned(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer``'s class has a known per-coordinate step (exact class: a subclass may change it), built
    in or registered; a Lookahead-style wrapper is looked through.

    Example:
        >>> p = torch.nn.Parameter(torch.zeros(1))
        >>> is_preconditioned(torch.optim.AdamW([p])), is_preconditioned(torch.optim.SGD([p], lr=0.1))
        (True, False)
    """
    optimizer = base_optimizer(optimizer)
    return type(optimizer) in RULES or type(optimizer) in REGISTERED


def step_formula(optimizer: torch.optim.Optimizer, preconditioned: bool = True) -> str:
    """The prox step ``optimizer`` gets, in words, for the fit-start report (``lr`` unless ``preconditioned``).

    Example:
        >>> step_formula(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1))
        'SGD: lr'
    """
    base = base_optimizer(optimizer)
    name = type(base).__name__
    if preconditioned and name in FORMULAS and type(base) in RULES:
        return f"{name}: {FORMULAS[name]}, where v = 0: the typical step (mean v of the stepped)"
    if preconditioned and type(base) in REGISTERED:
        return f"{name}: its registered step rule"
    if preconditioned and type(base) is torch.optim.ASGD:
        return f"{name}: eta = lr / (1 + lambd * lr * (step - 1))^alpha"
    momentum = preconditioned and name == "SGD" and any(g.get("momentum", 0.0) for g in base.param_groups)
    return f"{name}: {'lr * (1 - dampening) / (1 - momentum)' if momentum else 'lr'}"


def _bounded(metric: Metric) -> Step:
    return metric if isinstance(metric, (float, int, Tensor)) else metric.bounded()


def metric_rule(optimizer: torch.optim.Optimizer, group: dict[str, Any]) -> MetricRule | None:
    """``param -> metric``: what ``step_rule`` bounds, unevaluated (an :class:`AdaptiveStep` for the adaptive
    optimizers, which a fused kernel reads without making ``t``); ``None`` without a known rule or when ``lr = 0``."""
    optimizer = base_optimizer(optimizer)
    make = _make(optimizer)
    lr = float(group["lr"])
    if make is None or lr == 0.0:
        return None
    rule = make(optimizer, group)
    return lambda p: rule(p) if optimizer.state.get(p) else lr


def step_rule(optimizer: torch.optim.Optimizer, group: dict[str, Any]) -> StepRule:
    """``param -> t``: the step ``optimizer`` just took on each coordinate of a parameter of ``group``, bounded.

    A tensor shaped like the parameter (its local shard under FSDP2), or the float ``lr`` for optimizers
    without a known per-coordinate step and for a parameter the optimizer has no state for; ``0.0`` when the
    group's ``lr`` is 0 (the prox is then the identity). The per-coordinate step is bounded by the tensor's typical
    one where the optimizer has not stepped yet (``v = 0``, ``lightreg.proximal.adaptive_step``): such a coordinate is not wiped.
    Call it after ``optimizer.step()``; each call makes one temporary of the parameter's size.

    Example:
        >>> p = torch.nn.Parameter(torch.tensor([1.0, -2.0])); opt = torch.optim.Adam([p], lr=0.1)
        >>> p.grad = torch.tensor([0.5, 4.0]); opt.step()
        >>> step_rule(opt, opt.param_groups[0])(p)  # first step: v_hat = g², t = lr / (|g| + eps)
        tensor([0.2000, 0.0250])
    """
    lr = float(group["lr"])
    if lr == 0.0:
        return lambda p: 0.0
    rule = metric_rule(optimizer, group)
    if rule is None:
        return lambda p: lr
    return lambda p: _bounded(rule(p))


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
    if type(base_optimizer(optimizer)) is torch.optim.SGD and group.get("momentum", 0.0):
        return lr * (1.0 - float(group.get("dampening", 0.0))) / (1.0 - float(group["momentum"]))
    return lr


def unknown_adaptive_state(optimizer: torch.optim.Optimizer) -> list[str]:
    """The per-coordinate state names (``exp_avg_sq``...) of an optimizer whose step lightreg does not know.

    Empty for known optimizers and for optimizers without such state (SGD). Look at it after a step.

    Example:
        >>> p = torch.nn.Parameter(torch.ones(1)); p.grad = torch.ones(1)
        >>> opt = torch.optim.Adamax([p]); opt.step(); unknown_adaptive_state(opt)
        ['exp_inf']
    """
    optimizer = base_optimizer(optimizer)
    if is_known(optimizer):
        return []
    keys = {k for state in optimizer.state.values() for k in state}
    return [k for k in ADAPTIVE_STATE if k in keys]


def unknown_optimizer_message(optimizer: torch.optim.Optimizer, who: str) -> str | None:
    """The one warning for an optimizer whose step lightreg does not know (``None`` for a known one): it names the
    class, any per-coordinate state it keeps, and how to give its rule."""
    if is_known(optimizer):
        return None
    name = type(base_optimizer(optimizer)).__name__
    keys = unknown_adaptive_state(optimizer)
    kept = f" keeps per-coordinate state {keys} but" if keys else ""
    return (f"{who}: {name}{kept} is not an optimizer whose step lightreg knows; the prox takes its plain lr. Give its "
            f"step with lightreg.register_step_rule({name}, ...) (docs/extending.md), or pass preconditioned=False.")


def warn_unknown_adaptive(optimizer: torch.optim.Optimizer, who: str, warn: Callable[[str], Any]) -> None:
    """Warn (through ``warn``) when lightreg does not know ``optimizer``'s step (see :func:`unknown_optimizer_message`)."""
    message = unknown_optimizer_message(optimizer, who)
    if message:
        warn(message)


class LazySteps(Sequence):
    """The steps of ``params`` under ``rule``, each computed when read and not kept.

    A list of per-coordinate steps would hold a temporary the size of the whole selection; this sequence
    holds none, so a loop over it keeps at most the current parameter's step alive. ``metric`` (optional) is the
    rule unevaluated (``metric_rule``), from which a fused kernel computes the bounded step and the prox in one pass.
    """

    def __init__(self, rule: StepRule, params: Sequence[Tensor], metric: MetricRule | None = None) -> None:
        self.rule, self.params, self.metric = rule, params, metric

    def __len__(self) -> int:
        return len(self.params)

    def __getitem__(self, i: int) -> Step:  # type: ignore[override]
        return self.rule(self.params[i])

    def __iter__(self) -> Iterator[Step]:
        return (self.rule(p) for p in self.params)


def has_step_rule(optimizer: torch.optim.Optimizer) -> bool:
    """Whether lightreg has a step rule for ``optimizer`` beyond the group's ``lr`` (adaptive, ASGD, registered)."""
    return _make(base_optimizer(optimizer)) is not None
