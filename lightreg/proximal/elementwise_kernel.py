"""The elementwise penalties' prox in an adaptive optimizer's metric, as one C loop per penalty and dtype (CPU).

Per coordinate, with the step written ``t = C / q`` (``q = sqrt(v) + e``, ``C = c d``, ``e = eps d`` for
``t = c / (sqrt(v) / d + eps)``), ``a = alpha_1 C`` and ``b = alpha_2 C``, one square root and at most one division::

    L1          w - sign(w) a / q             where |w| > a / q, else 0
    L2          w q / (q + b)
    ElasticNet  sign(w) (|w| q - a) / (q + b)  where |w| q > a, else 0
    L0          w                             where w² q > 2 a, else 0

A loop reads ``w`` and ``v`` once and writes ``w`` once. The first pass takes the coordinates the optimizer has
stepped (``v > 0``) and counts the others, which it keeps as they are; only when that count is not 0 (an embedding's
unseen rows, a feature that is always 0) does a second pass give them the typical step, ``q = sqrt(v̄) + e`` with
``v̄ = mean(v_j : v_j > 0)`` (or ``C / fallback`` while nothing has stepped: ``lightreg.proximal.adaptive_step``).
So the common case costs one pass and no reduction, and the result is the eager reference's to rounding (the
rearranged formula above; tested).

The functions are plain C99, built and cached by ``lightreg.base.c_kernels`` (about 1 s, once per machine) and called
through ``ctypes``, which costs a few microseconds per tensor (``torch.compile``'s call costs about 30-50) and
releases the GIL: a large tensor is split over ``torch.get_num_threads()`` threads.
"""

from __future__ import annotations

import ctypes
import math
from typing import Any

import torch
from torch import Tensor
from torch.autograd.graph import increment_version

from lightreg.base.c_kernels import load, split
from lightreg.proximal.adaptive_step import AdaptiveStep

SOURCE = r"""
#include <math.h>
#include <stdint.h>

/* unstepped = 0: coordinates with v > 0 take q = sqrt(v) + e, the others are kept and counted.
   unstepped = 1: coordinates without v > 0 take q = qu, the others are kept. */
#define DEFINE_PROX(T, S, NAME, SQRT, FABS, COPYSIGN, NEW)                                                   \
int64_t NAME##_##S(T *w, const T *v, int64_t lo, int64_t hi, T e, T a, T b, T qu, int64_t unstepped) {      \
    int64_t kept = 0;                                                                                        \
    if (!unstepped) {                                                                                        \
        _Pragma("omp simd reduction(+:kept)")                                                                \
        for (int64_t i = lo; i < hi; ++i) {                                                                  \
            T x = w[i], vi = v[i];                                                                           \
            int stepped = vi > 0;                                                                            \
            T q = SQRT(stepped ? vi : (T)1) + e;                                                             \
            T y = NEW;                                                                                       \
            w[i] = stepped ? y : x;                                                                          \
            kept += !stepped;                                                                                \
        }                                                                                                    \
    } else {                                                                                                 \
        for (int64_t i = lo; i < hi; ++i) {                                                                  \
            if (v[i] > 0) continue;                                                                          \
            T x = w[i], q = qu;                                                                              \
            w[i] = NEW;                                                                                      \
        }                                                                                                    \
    }                                                                                                        \
    return kept;                                                                                             \
}

/* Written "zero where ... <= ..., else": a NaN weight fails the comparison and stays NaN, as in the eager step. */
#define L1_NEW(FABS, COPYSIGN) (FABS(x) <= a / q ? 0 : x - COPYSIGN(a / q, x))
#define L2_NEW(FABS, COPYSIGN) (x * q / (q + b))
#define EN_NEW(FABS, COPYSIGN) (FABS(x) * q <= a ? 0 : COPYSIGN(FABS(x) * q - a, x) / (q + b))
#define L0_NEW(FABS, COPYSIGN) (x * x * q <= 2 * a ? 0 : x)

#define DEFINE_ALL(T, S, SQRT, FABS, COPYSIGN)                                                               \
    DEFINE_PROX(T, S, l1, SQRT, FABS, COPYSIGN, L1_NEW(FABS, COPYSIGN))                                      \
    DEFINE_PROX(T, S, l2, SQRT, FABS, COPYSIGN, L2_NEW(FABS, COPYSIGN))                                      \
    DEFINE_PROX(T, S, elastic_net, SQRT, FABS, COPYSIGN, EN_NEW(FABS, COPYSIGN))                             \
    DEFINE_PROX(T, S, l0, SQRT, FABS, COPYSIGN, L0_NEW(FABS, COPYSIGN))

DEFINE_ALL(float, float, sqrtf, fabsf, copysignf)
DEFINE_ALL(double, double, sqrt, fabs, copysign)
"""

KERNELS = ("l1", "l2", "elastic_net", "l0")
_CTYPES = {torch.float32: ctypes.c_float, torch.float64: ctypes.c_double}
_library: dict[str, Any] = {}


def library() -> Any:
    """The kernels' library, with the functions' signatures set (built at the first call: ``c_kernels.load``)."""
    if "lib" not in _library:
        lib = load("elementwise_prox", SOURCE)
        for dtype, c in _CTYPES.items():
            for name in KERNELS:
                fn = getattr(lib, f"{name}_{c.__name__[2:]}")
                fn.restype = ctypes.c_int64
                fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, c, c, c, c,
                               ctypes.c_int64]
        _library["lib"] = lib
    return _library["lib"]


def applies(w: Tensor, step: AdaptiveStep) -> bool:
    """Whether the C kernel takes this tensor: plain, contiguous float32/float64 CPU tensors, float coefficients."""
    v = step.second_moment
    return (w.device.type == "cpu" and w.dtype in _CTYPES and v.dtype == w.dtype and v.device == w.device
            and not isinstance(step.numerator, Tensor) and not isinstance(step.divisor, Tensor)
            and v.data_ptr() != w.data_ptr())


def elementwise_prox_(name: str, w: Tensor, step: AdaptiveStep, alpha_1: float, alpha_2: float) -> None:
    """In place, the prox of the elementwise penalty ``name`` (``l1``, ``l2``, ``elastic_net``, ``l0``) with
    coefficients ``alpha_1`` (the L1 part, or L0's) and ``alpha_2`` (the squared L2 part's) in the bounded metric of
    ``step`` (``AdaptiveStep.bounded``), without making ``t``.

    ``w`` and ``step.second_moment``: contiguous CPU tensors of one shape and dtype (:func:`applies`).

    Example:
        >>> w = torch.tensor([0.5, -0.05, 2.0])  # t = 0.1 / (sqrt(v) + 0) = 0.1, 0.05: thresholds 0.1, 0.1, 0.05
        >>> elementwise_prox_("l1", w, AdaptiveStep(0.1, torch.tensor([1.0, 1.0, 4.0]), 1.0, 0.0, 0.1), 1.0, 0.0); w
        tensor([0.4000, 0.0000, 1.9500])
    """
    fn = getattr(library(), f"{name}_{_CTYPES[w.dtype].__name__[2:]}")
    c, d = float(step.numerator), float(step.divisor)
    scale, e = c * d, step.eps * d
    a, b = alpha_1 * scale, alpha_2 * scale
    w_ptr, v_ptr, n = w.data_ptr(), step.second_moment.data_ptr(), w.numel()
    kept = sum(split(n, 1, lambda lo, hi: fn(w_ptr, v_ptr, lo, hi, e, a, b, 1.0, 0)))
    if kept:  # some coordinates are unstepped: the typical step there
        vbar = float(step.typical())
        q = math.sqrt(vbar) + e if vbar > 0 else scale / step.fallback
        split(n, 1, lambda lo, hi: fn(w_ptr, v_ptr, lo, hi, e, a, b, q, 1))
    increment_version(w)  # written through a pointer: autograd must still see that it changed
