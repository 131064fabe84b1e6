"""Step rules for optimizers lightreg does not ship: a registry a user fills, and wrappers looked through.

``lightreg.proximal.metric`` knows torch's optimizers by class; :func:`register_step_rule` adds a user's own, and
:func:`base_optimizer` finds the optimizer that computes the step inside a Lookahead-style wrapper.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from lightreg.base.wrapped import unwrap

#: ``param -> step`` (a float, a tensor, or an ``AdaptiveStep``) for the parameters of one param group.
MetricRule = Callable[[torch.Tensor], Any]

#: Rules registered with :func:`register_step_rule` (a user's own optimizer).
REGISTERED: dict[type, Callable[[torch.optim.Optimizer, dict[str, Any]], MetricRule]] = {}
#: Attributes under which a wrapper (Lookahead-style) keeps the optimizer that computes the step.
WRAPPED = ("base_optimizer", "optimizer", "_base_optimizer")


def register_step_rule(optimizer_class: type, make_rule: Callable[[torch.optim.Optimizer, dict[str, Any]], MetricRule]) -> None:
    """Tell lightreg the step ``optimizer_class`` takes, for the proximal step (``preconditioned=True``).

    ``make_rule(optimizer, group)`` is called after each step with a live param group and returns ``param -> step``:
    a float (the one step every coordinate took), a tensor shaped like the parameter (taken as it is), or an
    :class:`~lightreg.proximal.adaptive_step.AdaptiveStep` ``numerator / (sqrt(v) / divisor + eps)``, which lightreg bounds by
    the tensor's typical step (``docs/extending.md``). The exact class is matched; a registered class is not warned
    about.

    Example:
        >>> class Lion(torch.optim.SGD): ...  # a sign-based optimizer: its step is lr per unit of sign
        >>> register_step_rule(Lion, lambda opt, group: lambda p: float(group["lr"]))
        >>> Lion in REGISTERED
        True
        >>> del REGISTERED[Lion]
    """
    if not isinstance(optimizer_class, type):
        raise TypeError(f"optimizer_class must be a class, got {optimizer_class!r}")
    if not callable(make_rule):
        raise TypeError(f"make_rule must be callable, got {make_rule!r}")
    REGISTERED[optimizer_class] = make_rule


def base_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The optimizer that computes the step: a ``LightningOptimizer`` and Lookahead-style wrappers (an attribute
    ``base_optimizer``, ``optimizer`` or ``_base_optimizer`` holding a torch optimizer) are unwrapped; a torch
    optimizer has none of them.

    Example:
        >>> inner = torch.optim.Adam([torch.nn.Parameter(torch.ones(1))])
        >>> class Lookahead(torch.optim.Optimizer):
        ...     def __init__(self, optimizer):
        ...         self.optimizer, self.param_groups, self.state = optimizer, optimizer.param_groups, optimizer.state
        >>> base_optimizer(Lookahead(inner)) is inner
        True
    """
    optimizer = unwrap(optimizer)
    for _ in range(8):  # a chain of wrappers, never a cycle
        if type(optimizer) in REGISTERED:
            return optimizer
        inner = next((getattr(optimizer, a) for a in WRAPPED if isinstance(getattr(optimizer, a, None), torch.optim.Optimizer)), None)
        if inner is None or inner is optimizer:
            return optimizer
        optimizer = unwrap(inner)
    return optimizer
