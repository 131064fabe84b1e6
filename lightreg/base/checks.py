"""Argument checks shared by the public constructors: fail fast, name the argument and the value."""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Real

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
