"""The Regularizer's own checks: its arguments, each optimizer param group and each parameter it meets.

They live next to the callback (not in ``lightreg.base.checks``) because they know the ``Penalty`` contract.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from lightreg.penalties.contract import Penalty


def check_optimizer_group(who: str, optimizer: torch.optim.Optimizer, index: int, names: Sequence[str]) -> None:
    """Refuse an optimizer param group whose selected parameters ``names`` no penalty mode can serve right.

    ``LBFGS`` evaluates its closure several times per step (Lightning runs ``on_before_optimizer_step``
    inside it) and its line search never sees the penalty; ``maximize=True`` ascends the loss, so a
    penalty added to the gradient would be maximised while a decoupled or proximal step minimises it.

    Example:
        >>> w = torch.nn.Parameter(torch.ones(2))
        >>> check_optimizer_group("Regularizer 'l1'", torch.optim.SGD([w], lr=0.1, maximize=True), 0, ["w"])
        Traceback (most recent call last):
        ...
        ValueError: Regularizer 'l1': SGD param group 0 has maximize=True (it holds ['w']); the penalty is always minimised, so negate the loss and keep maximize=False
    """
    if isinstance(optimizer, torch.optim.LBFGS):
        raise ValueError(
            f"{who}: LBFGS is not supported (it holds {list(names)}): it evaluates the closure several times per step "
            "and its line search never sees the penalty; use a first-order optimizer, or add the penalty to the loss"
        )
    if optimizer.param_groups[index].get("maximize", False):
        raise ValueError(
            f"{who}: {type(optimizer).__name__} param group {index} has maximize=True (it holds {list(names)}); "
            "the penalty is always minimised, so negate the loss and keep maximize=False"
        )


def check_dense_gradient(who: str, name: str, sparse: bool) -> None:
    """Refuse a parameter whose gradient is sparse (``Embedding(sparse=True)``) where a gradient is added to.

    Example:
        >>> check_dense_gradient("Regularizer 'l1'", "embed.weight", sparse=False)  # dense: no error
    """
    if sparse:
        raise TypeError(
            f"{who}: {name!r} belongs to an Embedding with sparse=True, whose sparse gradient mode='gradient' "
            "cannot add to; use mode='proximal' or 'decoupled', or sparse=False"
        )


def check_regularizer(penalty: object, mode: object, modes: Sequence[str], schedule: object, name: object,
                      preconditioned: object) -> None:
    """The ``Regularizer``'s own arguments: the penalty, a mode the penalty works in, the schedule, the name.

    Example:
        >>> from lightreg import L0
        >>> check_regularizer(L0(0.1), "gradient", ("gradient", "proximal"), None, None, True)
        Traceback (most recent call last):
        ...
        ValueError: L0(alpha=0.1) has no gradient: it works only with mode='proximal', got mode='gradient'
    """
    if not isinstance(penalty, Penalty):
        raise TypeError(f"penalty must be a lightreg Penalty (L1, L2, ElasticNet, L0, GroupLasso, CoupledGroupLasso, "
                        f"CoupledGroupL0, or your own subclass), got {penalty!r}")
    if mode not in modes:
        raise ValueError(f"mode must be one of {tuple(modes)}, got {mode!r}")
    if schedule is not None and not callable(schedule):
        raise TypeError(f"schedule must be a callable step -> factor, got {schedule!r}")
    if name is not None and (not isinstance(name, str) or not name or "/" in name):
        raise ValueError(f"name must be a non-empty string without '/', got {name!r}")
    if not isinstance(preconditioned, bool):
        raise TypeError(f"preconditioned must be True or False, got {preconditioned!r}")
    if penalty.proximal_only and mode != "proximal":
        raise ValueError(f"{penalty!r} has no gradient: it works only with mode='proximal', got mode={mode!r}")


class ParameterChecks:
    """The checks a penalty's callback makes of each parameter and param group it meets, each parameter once.

    Args:
        who: names the caller in messages, e.g. ``"Regularizer 'l1'"``.
        check_tensor: the penalty's ``check_tensor(name, w)``.
        sparse_gradients: ids of the parameters with sparse gradients, refused (mode ``gradient``).
        warn: where to warn, once, about parameters whose param group has ``weight_decay > 0``; ``None``
            when the penalty has no squared-norm part (no double decay to warn about).

    Example:
        >>> checks = ParameterChecks("Regularizer 'l2'", lambda name, w: None, set(), warn=print)
        >>> w = torch.nn.Parameter(torch.ones(2, 2))
        >>> checks.groups(torch.optim.SGD([w], lr=0.1, weight_decay=0.1), [(0, ["w"], [w])])
        Regularizer 'l2' penalises ['w'] whose optimizer param group already has weight_decay > 0: the squared norm is applied twice. Set weight_decay=0 there.
    """

    def __init__(
        self,
        who: str,
        check_tensor: Callable[[str, torch.Tensor], None],
        sparse_gradients: set[int],
        warn: Callable[[str], Any] | None = None,
    ) -> None:
        self.who, self.check_tensor, self.sparse_gradients, self.warn = who, check_tensor, sparse_gradients, warn
        self.checked: set[int] = set()

    def parameter(self, name: str, param: torch.Tensor) -> None:
        """Check ``param`` once; a lazy parameter waits until it has materialised."""
        if id(param) in self.checked or isinstance(param, torch.nn.parameter.UninitializedTensorMixin):
            return
        self.check_tensor(name, param)
        check_dense_gradient(self.who, name, id(param) in self.sparse_gradients)
        self.checked.add(id(param))

    def groups(self, optimizer: torch.optim.Optimizer, groups: Sequence[Any]) -> None:
        """Check the ``(index, names, params)`` groups of ``optimizer`` and their parameters."""
        for index, names, params in groups:
            check_optimizer_group(self.who, optimizer, index, names)
            for name, param in zip(names, params, strict=True):
                self.parameter(name, param)
        doubled = [n for index, names, _ in groups if optimizer.param_groups[index].get("weight_decay", 0) for n in names]
        if doubled and self.warn is not None:
            self.warn(
                f"{self.who} penalises {doubled} whose optimizer param group already has weight_decay > 0: "
                "the squared norm is applied twice. Set weight_decay=0 there."
            )
            self.warn = None  # once
