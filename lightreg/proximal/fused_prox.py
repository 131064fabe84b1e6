"""The preconditioned proximal step in one fused kernel: the bounded adaptive step and the prox, never ``t`` in memory.

The eager reference (``Penalty.apply_prox_`` over :class:`~lightreg.proximal.metric.LazySteps`) makes the step
``t = c / (sqrt(v) / d + eps)`` (``v`` floored where it is 0, ``lightreg.proximal.adaptive_step``) as a tensor, then
applies the prox with it: about ten passes over the weights and one temporary per parameter. The fused kernel of an
elementwise penalty (``L1``, ``L2``, ``ElasticNet``, ``L0``) reads ``v`` and ``w`` once and rewrites ``w`` in place,
with the step written as ``t = C / q``, ``q = sqrt(v) + e`` (``C = c d``, ``e = eps d``), so that a coordinate costs
one square root and at most one division (the formulas: ``lightreg.proximal.elementwise_kernel``). The results equal
the eager reference to rounding (the rearranged formula changes the order of a few operations; tested).

Two backends:

* **CPU: C loops** (``lightreg.proximal.elementwise_kernel``), built with the system's C compiler at the first step
  (about 1 s, once per machine: the library is cached on disk by the hash of its source) and called through
  ``ctypes`` for a few microseconds per tensor. From the first step, so that a run takes the same steps whether it
  started fresh or resumed from a checkpoint (resume is bit-exact) and on every rank.
* **Accelerators: ``torch.compile``** (inductor) of the same formula (``EAGER`` below), once per dtype
  (``dynamic=True``: any shape, any learning rate, no recompilation), for plain tensors. Compiling takes 5-30 s per
  kernel, which a short run never gets back, so the kernels are compiled once the process has taken
  ``COMPILE_AFTER_ELEMENTS = 5e9`` element-steps through the eager reference (the sizes of the parameters of every
  eager preconditioned prox, summed over steps): the ski-rental rule, which pays at most twice what the better
  choice in hindsight would. A run resumed before that point takes eager steps where the uninterrupted one took
  compiled ones: the same to rounding, not bit for bit.

``BUILD_AFTER_ELEMENTS`` (CPU, 0 by default) and ``COMPILE_AFTER_ELEMENTS`` set the thresholds; ``math.inf`` never builds. If building fails (no C compiler), lightreg
warns once and keeps the eager reference.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from lightreg.base.c_kernels import CompileError
from lightreg.proximal import elementwise_kernel
from lightreg.proximal.adaptive_step import AdaptiveStep
from lightreg.penalties.elastic_net import L1, L2, ElasticNet
from lightreg.penalties.l0 import L0
from lightreg.penalties.contract import Penalty, Step
from lightreg.proximal import fused_group_prox
from lightreg.proximal.metric import LazySteps

#: Element-steps taken through the eager preconditioned prox before the C kernels are built (CPU; see above).
BUILD_AFTER_ELEMENTS: float = 0
#: Element-steps taken through the eager preconditioned prox before the kernels are compiled (accelerators).
COMPILE_AFTER_ELEMENTS: float = 5e9

_state: dict[str, Any] = {"eager_elements": 0, "failed": False, "kernels": {}}


def _l1(w: Tensor, q: Any, a: Any, b: Any) -> Tensor:
    s = a / q  # the threshold a * t
    return torch.where(w.abs() <= s, 0.0, w - s.copysign(w))  # "<=": a NaN weight stays NaN, as in the eager step


def _l2(w: Tensor, q: Any, a: Any, b: Any) -> Tensor:
    return w * q / (q + b)  # w / (1 + b * t)


def _elastic_net(w: Tensor, q: Any, a: Any, b: Any) -> Tensor:
    wq = w.abs() * q  # soft(w, a t) / (1 + b t) = sign(w) (|w| q - a)_+ / (q + b): one division
    return torch.where(wq <= a, 0.0, (wq - a).copysign(w) / (q + b))


def _l0(w: Tensor, q: Any, a: Any, b: Any) -> Tensor:
    return torch.where(w * w * q <= 2.0 * a, 0.0, w)  # w² / t > 2 alpha, as L0.prox_ compares


def _q(v: Tensor, q_unstepped: Any, e: Any) -> Tensor:
    return torch.where(v > 0, v.sqrt() + e, q_unstepped)


# One function (one code object) per penalty: torch.compile caches its graphs per code object, at most 8 each.
def _fused_l1(w: Tensor, v: Tensor, q_unstepped: Any, e: Any, a: Any, b: Any) -> None:
    w.copy_(_l1(w, _q(v, q_unstepped, e), a, b))


def _fused_l2(w: Tensor, v: Tensor, q_unstepped: Any, e: Any, a: Any, b: Any) -> None:
    w.copy_(_l2(w, _q(v, q_unstepped, e), a, b))


def _fused_elastic_net(w: Tensor, v: Tensor, q_unstepped: Any, e: Any, a: Any, b: Any) -> None:
    w.copy_(_elastic_net(w, _q(v, q_unstepped, e), a, b))


def _fused_l0(w: Tensor, v: Tensor, q_unstepped: Any, e: Any, a: Any, b: Any) -> None:
    w.copy_(_l0(w, _q(v, q_unstepped, e), a, b))


#: The fused kernels as torch code (what ``torch.compile`` compiles for accelerators, and the C kernels' formula):
#: ``w <- prox_{t R}(w)`` with ``t = C / q``, ``q = sqrt(v) + e`` where ``v > 0`` and ``q_unstepped`` elsewhere.
EAGER: dict[str, Callable[..., None]] = {"l1": _fused_l1, "l2": _fused_l2, "elastic_net": _fused_elastic_net,
                                         "l0": _fused_l0}


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


def kernel(name: str) -> Callable[..., None]:
    """The compiled kernel ``name`` (compiled at its first call, then cached for the process)."""
    kernels = _state["kernels"]
    if name not in kernels:
        kernels[name] = torch.compile(EAGER[name], dynamic=True)
    return kernels[name]


def _scalar(x: float | Tensor) -> float | Tensor:
    return float(x) if isinstance(x, Tensor) and x.device.type == "cpu" else x


def fused_prox_(kernel_fn: Callable[..., None], w: Tensor, step: AdaptiveStep, a: float, b: float) -> None:
    """``w <- prox_{t R}(w)`` in place through ``kernel_fn`` (one of ``EAGER``, compiled or not), with the bounded
    step of ``step``: ``t = c / (sqrt(v) / d + eps) = C / (sqrt(v) + e)``, ``C = c d``, ``e = eps d``; where
    ``v = 0`` the typical step ``C / (sqrt(v̄) + e)``, or ``fallback`` while no coordinate has stepped."""
    c, d = _scalar(step.numerator), _scalar(step.divisor)
    scale, e = c * d, step.eps * d
    vbar = step.typical()  # 0-d, on v's device: no host sync
    q_unstepped = torch.where(vbar > 0, vbar.sqrt() + e, scale / step.fallback)
    kernel_fn(w.detach().view(-1), step.second_moment.view(-1), q_unstepped, e, a * scale, b * scale)


def _fusable(w: Tensor, step: Any) -> bool:
    if not isinstance(step, AdaptiveStep) or step.mean is not None:  # a sharded v: its mean is global
        return False
    v = step.second_moment
    return (type(w) in (Tensor, torch.nn.Parameter) and type(v) in (Tensor, torch.nn.Parameter) and w.numel() > 0
            and v.shape == w.shape and v.dtype == w.dtype and v.device == w.device
            and w.is_contiguous() and v.is_contiguous() and not isinstance(step.numerator, Tensor))


def _warn_failed(what: str, error: Exception) -> None:
    _state["failed"] = True
    warnings.warn(f"lightreg: {what} the fused prox kernel failed ({type(error).__name__}: {error}); the eager step "
                  "is used from now on", stacklevel=3)


def _fused_one(name: str, w: Tensor, step: AdaptiveStep, a: float, b: float) -> bool:
    """The fused step of one tensor through the backend of its device, once it pays; ``False``: take the eager one."""
    if w.device.type == "cpu":
        if not elementwise_kernel.applies(w, step) or _state["eager_elements"] < BUILD_AFTER_ELEMENTS:
            return False
        try:
            elementwise_kernel.elementwise_prox_(name, w, step, a, b)
        except CompileError as error:  # no C compiler, or it failed: found at the first call
            _warn_failed("building", error)
            return False
        return True
    if _state["eager_elements"] < COMPILE_AFTER_ELEMENTS:
        return False
    try:
        fused_prox_(kernel(name), w, step, a, b)
    except Exception as error:  # noqa: BLE001 - a missing compiler shows up here, at the first call
        _warn_failed("compiling", error)
        return False
    return True


def apply_prox(penalty: Penalty, tensors: Sequence[Tensor], steps: Step | Sequence[Step], alpha: float) -> None:
    """``w <- prox_{t R}(w)`` for each tensor, as ``penalty.apply_prox_`` does, through the fused kernel where it
    applies (a built-in elementwise penalty, an adaptive optimizer's step, plain contiguous tensors) and pays."""
    if fused_group_prox.applies(penalty, steps):  # GroupLasso: its own kernel (lightreg.proximal.fused_group_prox)
        return fused_group_prox.apply_group_prox(penalty, tensors, steps, alpha)  # type: ignore[arg-type]
    coefficients = _coefficients(penalty, alpha) if isinstance(steps, LazySteps) and steps.metric is not None else None
    if coefficients is None or alpha == 0.0 or _state["failed"]:
        return penalty.apply_prox_(tensors, steps, alpha)
    name, a, b = coefficients
    for i, w in enumerate(tensors):
        step = steps.metric(steps.params[i])  # type: ignore[union-attr]
        if not _fusable(w, step):
            penalty.prox_(w, step if isinstance(step, (float, int, Tensor)) else step.bounded(), alpha)
        elif _state["failed"] or not _fused_one(name, w, step, a, b):
            _state["eager_elements"] += w.numel()
            penalty.prox_(w, step.bounded(), alpha)  # the reference


def fused_reference(penalty: Penalty, w: Tensor, step: AdaptiveStep, alpha: float) -> None:
    """The fused kernel's formula run eagerly (uncompiled), in place: what the compiled kernel computes."""
    coefficients = _coefficients(penalty, alpha)
    if coefficients is None:
        raise ValueError(f"{penalty!r} has no fused kernel")
    name, a, b = coefficients
    fused_prox_(EAGER[name], w, step, a, b)
