"""The preconditioned proximal step in one fused kernel: the bounded adaptive step and the prox, never ``t`` in memory.

The eager reference (``Penalty.apply_prox_`` over :class:`~lightreg.proximal.metric.LazySteps`) makes the step
``t = c / (sqrt(v) / d + eps)`` (``v`` floored where it is 0, ``lightreg.proximal.adaptive_step``) as a tensor, then applies the prox with it: about ten passes over the
weights and one temporary per parameter. The fused kernel of an elementwise penalty (``L1``, ``L2``, ``ElasticNet``,
``L0``) reads ``v`` and ``w`` once and rewrites ``w`` in place (``v̄``, the typical second moment, is computed
before it only where some ``v`` is 0, which on the CPU costs one read of ``v`` to check): ``torch.compile`` (inductor)
generates it, once per dtype (``dynamic=True``: any shape, any learning rate, no recompilation), for plain tensors.
The results equal the eager reference to rounding (fusion changes the order of a few operations; tested).

Compiling takes seconds (about 3-30 s per kernel on one CPU core), which a short run never gets back, so the eager
reference runs first and the kernels are compiled once the process has taken ``COMPILE_AFTER_ELEMENTS``
element-steps through it (the sum of the sizes of the parameters of every eager preconditioned prox): the
ski-rental rule, which pays at most twice what the better choice in hindsight would. The eager step costs about
1 ns per element more than the fused one on one CPU core (10.8 against 7.7 ms for 3.1 M weights, ``scripts/bench.py``),
so 5e9 element-steps (about 1,600 steps of a 3 M-weight selection) is about the 5-12 s one kernel's compilation
takes there. Set it to 0 to compile at the first step, ``math.inf`` never
to. If compilation fails (no C++ compiler), lightreg warns once and keeps the eager reference.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from lightreg.proximal.adaptive_step import AdaptiveStep, typical_second_moment
from lightreg.penalties.elastic_net import L1, L2, ElasticNet
from lightreg.penalties.l0 import L0
from lightreg.penalties.contract import Penalty, Step
from lightreg.proximal import fused_group_prox
from lightreg.proximal.metric import LazySteps

#: Element-steps taken through the eager preconditioned prox before the fused kernels are compiled (see above).
COMPILE_AFTER_ELEMENTS: float = 5e9

_state: dict[str, Any] = {"eager_elements": 0, "failed": False, "kernels": {}}


def _soft_threshold(w: Tensor, s: Tensor) -> Tensor:
    return torch.where(w.abs() > s, w - s.copysign(w), 0.0)


def _step(v: Tensor, vbar: Tensor, numerator: Any, divisor: Any, eps: float, fallback: float) -> Tensor:
    floored = torch.where(v > 0, v, vbar)
    return torch.where(floored > 0, numerator / (floored.sqrt() / divisor + eps), fallback)


def _l1(w: Tensor, v: Tensor, vbar: Tensor, numerator: Any, divisor: Any, eps: float, fallback: float, a: float, b: float) -> None:
    w.copy_(_soft_threshold(w, _step(v, vbar, numerator, divisor, eps, fallback) * a))


def _l2(w: Tensor, v: Tensor, vbar: Tensor, numerator: Any, divisor: Any, eps: float, fallback: float, a: float, b: float) -> None:
    w.copy_(w / (_step(v, vbar, numerator, divisor, eps, fallback) * b + 1.0))


def _elastic_net(w: Tensor, v: Tensor, vbar: Tensor, numerator: Any, divisor: Any, eps: float, fallback: float, a: float, b: float) -> None:
    t = _step(v, vbar, numerator, divisor, eps, fallback)
    w.copy_(_soft_threshold(w, t * a) / (t * b + 1.0))


def _l0(w: Tensor, v: Tensor, vbar: Tensor, numerator: Any, divisor: Any, eps: float, fallback: float, a: float, b: float) -> None:
    t = _step(v, vbar, numerator, divisor, eps, fallback)
    w.copy_(torch.where(w * w / t > 2.0 * a, w, 0.0))  # the comparison L0.prox_ makes


def _coefficients(penalty: Penalty, alpha: float) -> tuple[str, float, float] | None:
    """``(kernel, a, b)``: the soft-threshold and scale coefficients of an elementwise penalty at ``alpha``."""
    kind = type(penalty)
    if kind is L1:
        return "l1", alpha, 0.0
    if kind is L2:
        return "l2", 0.0, alpha
    if kind is ElasticNet:
        rho = penalty.l1_ratio  # type: ignore[attr-defined]
        return ("elastic_net", alpha * rho, alpha * (1.0 - rho)) if rho > 0.0 else ("l2", 0.0, alpha)
    if kind is L0:
        return "l0", alpha, 0.0
    return None  # a subclass or a user's penalty: its own prox_, eagerly


EAGER: dict[str, Callable[..., None]] = {"l1": _l1, "l2": _l2, "elastic_net": _elastic_net, "l0": _l0}


def kernel(name: str) -> Callable[..., None]:
    """The compiled kernel ``name`` (compiled at its first call, then cached for the process)."""
    kernels = _state["kernels"]
    if name not in kernels:
        kernels[name] = torch.compile(EAGER[name], dynamic=True)
    return kernels[name]


def typical_or_unused(step: AdaptiveStep) -> Tensor:
    """``v̄`` for the kernel: on the CPU, where reading a value is free, computed only when some ``v`` is 0 (one read
    of ``v`` for the check instead of the two of the reduction); elsewhere always (no host sync)."""
    v = step.second_moment
    if v.device.type == "cpu" and v.min().item() > 0:
        return v.new_zeros(())  # every coordinate stepped: the kernel never takes v̄
    return step.typical()


def _fusable(w: Tensor, step: Any) -> bool:
    if not isinstance(step, AdaptiveStep) or step.mean is not None:  # a sharded v: its mean is global
        return False
    v = step.second_moment
    return (type(w) in (Tensor, torch.nn.Parameter) and type(v) in (Tensor, torch.nn.Parameter) and w.numel() > 0
            and v.shape == w.shape and v.dtype == w.dtype and v.device == w.device
            and w.is_contiguous() and v.is_contiguous() and not isinstance(step.numerator, Tensor))


def apply_prox(penalty: Penalty, tensors: Sequence[Tensor], steps: Step | Sequence[Step], alpha: float) -> None:
    """``w <- prox_{t R}(w)`` for each tensor, as ``penalty.apply_prox_`` does, through the fused kernel where it
    applies (a built-in elementwise penalty, an adaptive optimizer's step, plain contiguous tensors) and pays."""
    if fused_group_prox.applies(penalty, steps):  # GroupLasso: its own kernel (lightreg.proximal.fused_group_prox)
        return fused_group_prox.apply_group_prox(penalty, tensors, steps, alpha)  # type: ignore[arg-type]
    coefficients = _coefficients(penalty, alpha) if isinstance(steps, LazySteps) and steps.metric is not None else None
    if coefficients is None or alpha == 0.0 or _state["failed"]:
        return penalty.apply_prox_(tensors, steps, alpha)
    name, a, b = coefficients
    compiled = _state["eager_elements"] >= COMPILE_AFTER_ELEMENTS
    for i, w in enumerate(tensors):
        step = steps.metric(steps.params[i])  # type: ignore[union-attr]
        if not _fusable(w, step):
            penalty.prox_(w, step if isinstance(step, (float, int, Tensor)) else step.bounded(), alpha)
            continue
        if not compiled:
            _state["eager_elements"] += w.numel()
            penalty.prox_(w, step.bounded(), alpha)  # the reference
            continue
        flat = w.detach().view(-1)
        args = (flat, step.second_moment.view(-1), typical_or_unused(step), step.numerator, step.divisor, step.eps,
                step.fallback, a, b)
        try:
            kernel(name)(*args)
        except Exception as error:  # noqa: BLE001 - a missing compiler shows up here, at the first call
            _state["failed"] = True
            warnings.warn(f"lightreg: compiling the fused prox kernel failed ({type(error).__name__}: {error}); "
                          "the eager step is used from now on", stacklevel=2)
            penalty.prox_(w, step.bounded(), alpha)


def fused_reference(penalty: Penalty, w: Tensor, step: AdaptiveStep, alpha: float) -> None:
    """The fused kernel's formula run eagerly (uncompiled), in place: what the compiled kernel computes."""
    coefficients = _coefficients(penalty, alpha)
    if coefficients is None:
        raise ValueError(f"{penalty!r} has no fused kernel")
    name, a, b = coefficients
    EAGER[name](w, step.second_moment, typical_or_unused(step), step.numerator, step.divisor, step.eps, step.fallback, a, b)
