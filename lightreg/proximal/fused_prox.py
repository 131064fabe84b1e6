"""The preconditioned proximal step in one fused kernel: the bounded adaptive step and the prox, never ``t`` in memory.

The eager reference (``Penalty.apply_prox_`` over :class:`~lightreg.proximal.metric.LazySteps`) makes the step
``t = c / (sqrt(v) / d + eps)`` (``v`` floored where it is 0, ``lightreg.proximal.adaptive_step``) as a tensor, then
applies the prox with it: about ten passes over the weights and one temporary per parameter. The fused kernel of an
elementwise penalty (``L1``, ``L2``, ``ElasticNet``, ``L0``) reads ``v`` and ``w`` once and rewrites ``w`` in place,
with the step written as ``t = C / q``, ``q = sqrt(v) + e`` (``C = c d``, ``e = eps d``), so that a coordinate costs
one square root and at most one division::

    L1          w - sign(w) a C / q            where |w| > a C / q, else 0
    L2          w q / (q + b C)
    ElasticNet  sign(w) (|w| q - a C) / (q + b C)   where |w| q > a C, else 0
    L0          w                              where w² q > 2 a C, else 0

Where ``v = 0`` (a coordinate the optimizer has not stepped) ``q`` is that of the typical step, ``sqrt(v̄) + e``.
On the CPU a tensor whose ``v`` has no zero (read once, then every ``RECHECK_EVERY`` steps: a ``v > 0`` stays
positive) skips ``v̄`` and keeps any such coordinate unchanged instead, which costs no extra pass over ``v``.
``torch.compile`` (inductor) generates the kernels, once per dtype (``dynamic=True``: any shape, any learning rate, no
recompilation), for plain tensors. The results equal the eager reference to rounding (the algebra above and fusion
change the order of a few operations; tested).

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
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from lightreg.proximal.adaptive_step import AdaptiveStep
from lightreg.penalties.elastic_net import L1, L2, ElasticNet
from lightreg.penalties.l0 import L0
from lightreg.penalties.contract import Penalty, Step
from lightreg.proximal.metric import LazySteps

#: Element-steps taken through the eager preconditioned prox before the fused kernels are compiled (see above).
COMPILE_AFTER_ELEMENTS: float = 5e9

_state: dict[str, Any] = {"eager_elements": 0, "failed": False, "kernels": {}}


def _l1(w: Tensor, q: Any, a: Any, b: Any) -> Tensor:
    s = a / q  # the threshold a * t
    return torch.where(w.abs() > s, w - s.copysign(w), 0.0)


def _l2(w: Tensor, q: Any, a: Any, b: Any) -> Tensor:
    return w * q / (q + b)  # w / (1 + b * t)


def _elastic_net(w: Tensor, q: Any, a: Any, b: Any) -> Tensor:
    wq = w.abs() * q  # soft(w, a t) / (1 + b t) = sign(w) (|w| q - a)_+ / (q + b): one division
    return torch.where(wq > a, (wq - a).copysign(w) / (q + b), 0.0)


def _l0(w: Tensor, q: Any, a: Any, b: Any) -> Tensor:
    return torch.where(w * w * q > 2.0 * a, w, 0.0)  # w² / t > 2 alpha, as L0.prox_ compares


def _q(v: Tensor, q_unstepped: Any, e: Any) -> Tensor:
    return torch.where(v > 0, v.sqrt() + e, q_unstepped)


def _store(w: Tensor, v: Tensor, new: Tensor, keep_unstepped: bool) -> None:
    w.copy_(torch.where(v > 0, new, w) if keep_unstepped else new)


# One function (one code object) per penalty: torch.compile caches its graphs per code object, at most 8 each.
def _fused_l1(w: Tensor, v: Tensor, q_unstepped: Any, e: Any, a: Any, b: Any, keep_unstepped: bool) -> None:
    _store(w, v, _l1(w, _q(v, q_unstepped, e), a, b), keep_unstepped)


def _fused_l2(w: Tensor, v: Tensor, q_unstepped: Any, e: Any, a: Any, b: Any, keep_unstepped: bool) -> None:
    _store(w, v, _l2(w, _q(v, q_unstepped, e), a, b), keep_unstepped)


def _fused_elastic_net(w: Tensor, v: Tensor, q_unstepped: Any, e: Any, a: Any, b: Any, keep_unstepped: bool) -> None:
    _store(w, v, _elastic_net(w, _q(v, q_unstepped, e), a, b), keep_unstepped)


def _fused_l0(w: Tensor, v: Tensor, q_unstepped: Any, e: Any, a: Any, b: Any, keep_unstepped: bool) -> None:
    _store(w, v, _l0(w, _q(v, q_unstepped, e), a, b), keep_unstepped)


#: The fused kernels, uncompiled (the formula the compiled kernels run, and what they are tested against):
#: ``w <- prox_{t R}(w)`` with ``t = C / q``, ``q = sqrt(v) + e`` where ``v > 0``, and ``q_unstepped`` elsewhere, or
#: ``w`` kept there (``keep_unstepped``).
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


#: A tensor's ``v`` found free of zeros is checked again after this many steps: a ``v > 0`` stays positive under the
#: optimizers' updates (``beta2 v + (1 - beta2) g²`` decays to the smallest subnormal at worst, and a sum only grows),
#: except where subnormals are flushed to zero, or where a user rewrites the state.
RECHECK_EVERY = 64

_all_stepped_left: dict[int, tuple[weakref.ref, int]] = {}


def all_stepped(v: Tensor) -> bool:
    """Whether every ``v_i > 0`` (CPU, where reading the answer is free), read once every ``RECHECK_EVERY`` calls for
    the same tensor: between reads the kernel keeps a coordinate whose ``v`` became 0 unchanged (it is not wiped)."""
    ref, left = _all_stepped_left.get(id(v), (None, 0))
    if left > 0 and ref is not None and ref() is v:
        _all_stepped_left[id(v)] = (ref, left - 1)
        return True
    if len(_all_stepped_left) > 4096:  # forget tensors that are gone (a new optimizer, a reloaded state)
        for key in [k for k, (r, _) in _all_stepped_left.items() if r() is None]:
            del _all_stepped_left[key]
    if v.min().item() > 0:
        _all_stepped_left[id(v)] = (weakref.ref(v), RECHECK_EVERY - 1)
        return True
    _all_stepped_left.pop(id(v), None)
    return False


def _scalar(x: float | Tensor) -> float | Tensor:
    return float(x) if isinstance(x, Tensor) and x.device.type == "cpu" else x


def fused_prox_(kernel_fn: Callable[..., None], w: Tensor, step: AdaptiveStep, a: float, b: float) -> None:
    """``w <- prox_{t R}(w)`` in place through ``kernel_fn`` (one of ``EAGER``, compiled or not), with the bounded
    step of ``step``: ``t = c / (sqrt(v) / d + eps) = C / (sqrt(v) + e)``, ``C = c d``, ``e = eps d``; where
    ``v = 0`` the typical step ``C / (sqrt(v̄) + e)``, or ``fallback`` while no coordinate has stepped."""
    c, d = _scalar(step.numerator), _scalar(step.divisor)
    scale, e = c * d, step.eps * d
    w, v = w.detach().view(-1), step.second_moment.view(-1)
    if v.device.type == "cpu" and all_stepped(step.second_moment):  # the state tensor itself: the same every step
        return kernel_fn(w, v, 1.0, e, a * scale, b * scale, True)
    vbar = step.typical()  # 0-d, on v's device: no host sync
    q_unstepped = torch.where(vbar > 0, vbar.sqrt() + e, scale / step.fallback)
    kernel_fn(w, v, q_unstepped, e, a * scale, b * scale, False)


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
        try:
            fused_prox_(kernel(name), w, step, a, b)
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
    fused_prox_(EAGER[name], w, step, a, b)
