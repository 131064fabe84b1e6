"""GroupLasso's preconditioned prox through the fused group kernel, where it applies and pays.

The eager reference, ``GroupLasso._metric_prox_`` on the bounded step ``t`` (``LazySteps``), costs about ten passes
over the weights and two temporaries of a parameter's size; the kernel (``lightreg.proximal.group_prox_kernel``)
reads ``w`` and ``v`` once, writes ``w`` once and makes no tensor. Its results equal the reference's to rounding
(tested in float64 and float32). It applies to a ``GroupLasso`` without ``with_bias`` (a ``(row, bias)`` pair takes
the plain ``lr``, never a per-coordinate step: that path is the eager one), an adaptive optimizer's step
(:class:`~lightreg.proximal.adaptive_step.AdaptiveStep`, with float coefficients), and plain, contiguous float32 or
float64 CPU tensors. Anything else (a sharded ``DTensor`` parameter, 16-bit weights, an accelerator, a float step)
takes the eager reference, as before.

Built as the elementwise kernels are (``lightreg.proximal.fused_prox``): at the first step, with the system's C
compiler (about 1 s, once per machine: the library is cached on disk), so that a run takes the same steps whether it
started fresh or resumed from a checkpoint, and on every rank. It saves about 6 ns per element and step against the
eager reference (23.4 against 4-5 ms for 3.1 M weights with Adam, ``scripts/bench.py``), so even a build that is
not cached pays for itself within about 60 steps of a 3 M-weight selection. ``BUILD_AFTER_ELEMENTS`` (0) delays
the build until that many element-steps have gone through the eager reference; ``math.inf`` never builds. If
building fails (no C compiler), lightreg warns once and keeps the eager reference.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lightreg.base.c_kernels import CompileError
from lightreg.penalties.group_lasso import GroupLasso
from lightreg.proximal.adaptive_step import AdaptiveStep
from lightreg.proximal.group_prox_kernel import group_prox_
from lightreg.proximal.metric import LazySteps

#: Element-steps taken through the eager preconditioned group prox before the kernel is built (see above).
BUILD_AFTER_ELEMENTS: float = 0

_state: dict[str, Any] = {"eager_elements": 0, "failed": False}


def applies(penalty: object, steps: object) -> bool:
    """Whether :func:`apply_group_prox` handles this call of ``fused_prox.apply_prox``: a ``GroupLasso`` (exactly;
    without ``with_bias``) with an optimizer's per-coordinate metric."""
    return (type(penalty) is GroupLasso and not penalty.with_bias  # type: ignore[attr-defined]
            and isinstance(steps, LazySteps) and steps.metric is not None)


def _fusable(w: Tensor, step: Any) -> bool:
    if not isinstance(step, AdaptiveStep) or step.mean is not None:  # a sharded v: its mean is global
        return False
    v = step.second_moment
    scalars = (step.numerator, step.divisor, step.fallback)
    return (type(w) in (Tensor, torch.nn.Parameter) and type(v) in (Tensor, torch.nn.Parameter) and w.numel() > 0
            and w.device.type == "cpu" and w.dtype in (torch.float32, torch.float64) and w.ndim >= 1
            and v.shape == w.shape and v.dtype == w.dtype and v.device == w.device
            and w.is_contiguous() and v.is_contiguous() and v.data_ptr() != w.data_ptr()
            and not any(isinstance(x, Tensor) for x in scalars) and all(x > 0 for x in scalars))


def _reference(penalty: GroupLasso, w: Tensor, step: Any, alpha: float) -> None:
    penalty.prox_(w, step if isinstance(step, (float, int, Tensor)) else step.bounded(), alpha)


def apply_group_prox(penalty: GroupLasso, tensors: Sequence[Tensor], steps: LazySteps, alpha: float) -> None:
    """``w <- prox_{t R}(w)`` for each tensor, as ``penalty.apply_prox_(tensors, steps, alpha)`` does, through the
    fused kernel where it applies and pays (see the module's docstring)."""
    if alpha == 0.0 or _state["failed"]:
        return penalty.apply_prox_(tensors, steps, alpha)
    compiled = _state["eager_elements"] >= BUILD_AFTER_ELEMENTS
    for i, w in enumerate(tensors):
        step = steps.metric(steps.params[i])  # type: ignore[misc]
        if not _fusable(w, step):
            _reference(penalty, w, step, alpha)
            continue
        if not compiled:
            _state["eager_elements"] += w.numel()
            _reference(penalty, w, step, alpha)
            continue
        try:
            fused_group_prox_(penalty, w.detach(), step, alpha)
        except CompileError as error:  # no C compiler, or it failed
            _state["failed"] = True
            warnings.warn(f"lightreg: compiling the fused group-lasso prox kernel failed ({type(error).__name__}: "
                          f"{error}); the eager step is used from now on", stacklevel=2)
            _reference(penalty, w, step, alpha)


def fused_group_prox_(penalty: GroupLasso, w: Tensor, step: AdaptiveStep, alpha: float) -> None:
    """The kernel on one tensor: ``w <- prox`` of ``alpha * sqrt(|g|) * Σ_g ||w_g||`` in ``step``'s metric."""
    group_prox_(w, step.second_moment, penalty.dim, lambda: float(step.typical()), float(step.numerator),
                float(step.divisor), float(step.eps), float(step.fallback), alpha * penalty._group_scale(w))
