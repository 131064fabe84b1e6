"""Argument checks shared by the public constructors: fail fast, name the argument and the value."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from numbers import Real
from typing import Any

import torch


def check_real(name: str, value: object, *, low: float = 0.0, high: float = math.inf) -> float:
    """Return ``value`` as a float if it is a finite real in ``[low, high]``; raise otherwise."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value!r}")
    return value


def check_int(name: str, value: object, *, low: int | None = None) -> int:
    """Return ``value`` if it is an int (not a bool) no smaller than ``low``; raise otherwise."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value!r}")
    return value


def check_patterns(name: str, patterns: object) -> tuple[str, ...] | None:
    """Normalise ``include``/``exclude``: ``None``, one glob string, or a sequence of glob strings.

    An empty ``include`` would select nothing, ever: it is refused (``None`` means the default rule).
    """
    if patterns is None:
        return None
    if isinstance(patterns, str):
        patterns = [patterns]
    if not isinstance(patterns, Sequence):
        # Hydra's ListConfig is a Sequence; sets and generators would lose order or be consumed.
        raise TypeError(f"{name} must be a glob string or a list of them, got {patterns!r}")
    if name == "include" and len(patterns) == 0:
        raise ValueError("include=[] selects no parameter; pass include=None for the default rule")
    for pattern in patterns:
        if not isinstance(pattern, str) or not pattern:
            raise TypeError(f"{name} must hold non-empty glob strings, got {pattern!r} in {list(patterns)!r}")
    return tuple(patterns)


def check_tensor_kind(name: str, w: object, who: str) -> None:
    """Raise ``TypeError`` unless ``w`` is a dense (strided) real floating-point tensor.

    ``who`` names the caller in the message, e.g. ``"L1"``. Complex, integer and boolean tensors, and
    sparse or other non-strided layouts, are refused before any weight changes.

    Example:
        >>> check_tensor_kind("net.0.weight", torch.zeros(2, dtype=torch.complex64), "L1")
        Traceback (most recent call last):
        ...
        TypeError: L1 does not support 'net.0.weight': its dtype is torch.complex64; only real floating-point tensors (float16, bfloat16, float32, float64) are supported
    """
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{who} does not support {name!r}: it is a {type(w).__name__}, not a tensor")
    if w.layout != torch.strided:
        raise TypeError(f"{who} does not support {name!r}: its layout is {w.layout}; only dense (strided) tensors are supported")
    if not w.is_floating_point():
        raise TypeError(
            f"{who} does not support {name!r}: its dtype is {w.dtype}; only real floating-point tensors "
            "(float16, bfloat16, float32, float64) are supported"
        )


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


def check_distinct_names(kind: str, names: Sequence[str]) -> None:
    """Raise ``ValueError`` if two callbacks of ``kind`` share a ``name`` (their metrics and state would collide).

    Example:
        >>> check_distinct_names("Regularizer", ["l1", "l2", "l1"])
        Traceback (most recent call last):
        ...
        ValueError: two Regularizers have name='l1': give each its own name=... (it names their metrics reg/<name>/... and their checkpoint state)
    """
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ValueError(
                f"two {kind}s have name={name!r}: give each its own name=... "
                "(it names their metrics reg/<name>/... and their checkpoint state)"
            )
        seen.add(name)


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
