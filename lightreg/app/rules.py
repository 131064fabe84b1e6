"""The value ranges of lightreg's own constructors, checked on the config before torch loads.

``lightreg.L1(alpha=-1)`` raises ``alpha must be in [0.0, inf], got -1.0``, but only once torch is imported
(2 s here, and 6 s more for Lightning before the ``Regularizer`` can be built). The command line answers a
configuration error in well under that by checking the same ranges here, with the same words; the constructors
still check again when the run builds them. ``tests/test_app_rules.py`` holds every rule against the real
constructor (accepted and refused values, and the message), so the two cannot drift apart.

Types are not here: they come from the signatures' annotations (:mod:`lightreg.app.signatures`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

MODES = ("gradient", "decoupled", "proximal")  # lightreg.callbacks.regularizer.MODES (tested)
PENALTIES = ("lightreg.L1", "lightreg.L2", "lightreg.ElasticNet", "lightreg.GroupLasso", "lightreg.L0", "lightreg.CoupledGroupLasso",
             "lightreg.CoupledGroupL0")
#: Penalties whose prox makes exact zeros (a target can drive them), and those with a prox only.
MAKES_ZEROS = ("L1", "L0", "GroupLasso", "ElasticNet", "CoupledGroupLasso", "CoupledGroupL0")
PROXIMAL_ONLY = ("L0", "CoupledGroupL0")


def _in_range(name: str, value: Any, low: float = 0.0, high: float = math.inf) -> str | None:
    """``lightreg.base.checks.check_real``'s message, or ``None`` when ``value`` passes."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None  # a type error: the annotation check reports it
    if not math.isfinite(value):
        return f"{name} must be finite, got {float(value)!r}"
    if not low <= value <= high:
        return f"{name} must be in [{low}, {high}], got {float(value)!r}"
    return None


def _repr(target: str, kwargs: Mapping[str, Any]) -> str:
    """The penalty's ``repr`` (``ElasticNet(alpha=0.001, l1_ratio=0.3)``), as the constructor's messages print it."""
    name = target.rsplit(".", 1)[-1]
    parts = [f"alpha={float(kwargs.get('alpha', 0.0))!r}"]
    if name == "ElasticNet":
        parts.append(f"l1_ratio={float(kwargs.get('l1_ratio', 0.5))!r}")
    if name == "GroupLasso":
        parts.append(f"dim={kwargs.get('dim', 0)!r}")
        if kwargs.get("with_bias"):
            parts.append("with_bias=True")
    return f"{name}({', '.join(parts)})"


def penalty_errors(target: str, kwargs: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``[(key, message)]`` for the arguments of a lightreg penalty ``target`` that its constructor would refuse."""
    name = target.rsplit(".", 1)[-1]
    found = [("alpha", _in_range("alpha", kwargs.get("alpha", 0.0)))]
    if name == "ElasticNet":
        found.append(("l1_ratio", _in_range("l1_ratio", kwargs.get("l1_ratio", 0.5), 0.0, 1.0)))
    if name == "GroupLasso" and kwargs.get("with_bias") is True and kwargs.get("dim", 0) != 0:
        found.append(("with_bias", f"with_bias=True needs dim=0 (a bias entry belongs to an output unit), got dim={kwargs['dim']}"))
    return [(key, message) for key, message in found if message]


def _target_errors(target: str, penalty: Mapping[str, Any], kwargs: Mapping[str, Any]) -> list[tuple[str, str]]:
    value = kwargs.get("target_sparsity")
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return []
    if not 0.0 < value < 1.0:
        return [("target_sparsity", f"target_sparsity must be in (0, 1), got {value!r}")]
    found = []
    every = kwargs.get("target_every")
    if isinstance(every, int) and not isinstance(every, bool) and every < 1:
        found.append(("target_every", f"target_every must be >= 1, got {every!r}"))
    mode, name = kwargs.get("mode", "proximal"), target.rsplit(".", 1)[-1]
    zeros = name in MAKES_ZEROS and not (name == "ElasticNet" and penalty.get("l1_ratio", 0.5) == 0)
    if mode in MODES and (mode != "proximal" or not zeros):
        found.append(("target_sparsity", f"target_sparsity={value!r} needs mode='proximal' and a penalty whose prox makes "
                      f"zeros (L1, ElasticNet with l1_ratio > 0, L0, GroupLasso, CoupledGroupLasso), got {_repr(target, penalty)} in "
                      f"mode={mode!r}"))
    if kwargs.get("schedule") is not None:
        found.append(("schedule", f"target_sparsity sets alpha at every step; it takes no schedule, got {kwargs['schedule']!r}"))
    return found


def regularizer_errors(target: str, penalty: Mapping[str, Any], kwargs: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``[(key, message)]`` for the ``Regularizer`` arguments ``kwargs`` (``None`` = default) around the penalty
    ``target(**penalty)`` that ``Regularizer`` would refuse."""
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    found: list[tuple[str, str]] = []
    mode, name = kwargs.get("mode", "proximal"), target.rsplit(".", 1)[-1]
    if isinstance(mode, str) and mode not in MODES:
        found.append(("mode", f"mode must be one of {MODES}, got {mode!r}"))
    elif name in PROXIMAL_ONLY and mode != "proximal":
        found.append(("mode", f"{_repr(target, penalty)} has no gradient: it works only with mode='proximal', got mode={mode!r}"))
    reg_name = kwargs.get("name")
    if isinstance(reg_name, str) and (not reg_name or "/" in reg_name):
        found.append(("name", f"name must be a non-empty string without '/', got {reg_name!r}"))
    if kwargs.get("include") == []:
        found.append(("include", "include=[] selects no parameter; pass include=None for the default rule"))
    return found + _target_errors(target, penalty, kwargs)


#: The rules by ``_target_`` prefix, for the preflight: a function of (target, kwargs) -> [(key, message)].
CHECKS: dict[str, Callable[[str, Mapping[str, Any]], list[tuple[str, str]]]] = {p: penalty_errors for p in PENALTIES}
