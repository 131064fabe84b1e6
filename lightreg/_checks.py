"""Argument checks shared by the public constructors: fail fast, name the argument and the value."""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Real


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
    """Normalise ``include``/``exclude``: ``None``, one glob string, or a sequence of glob strings."""
    if patterns is None:
        return None
    if isinstance(patterns, str):
        patterns = [patterns]
    if not isinstance(patterns, Sequence):
        # Hydra's ListConfig is a Sequence; sets and generators would lose order or be consumed.
        raise TypeError(f"{name} must be a glob string or a list of them, got {patterns!r}")
    for pattern in patterns:
        if not isinstance(pattern, str) or not pattern:
            raise TypeError(f"{name} must hold non-empty glob strings, got {pattern!r} in {list(patterns)!r}")
    return tuple(patterns)
