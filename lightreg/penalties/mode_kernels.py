"""The gradient and decoupled modes in one pass: ``g += ∇R(w)`` and ``w -= s ∇R(w)`` as C loops over the tensors.

The eager steps make a temporary (``sign(w)``; ``GroupLasso``: the group norms, then the scale) and pass over the
weights two or three times. Each kernel here is one loop that reads ``w`` (and ``g``) and writes the result in place,
for plain, contiguous float32/float64 CPU tensors (split over ``torch.get_num_threads()`` threads when large) (anything else, and ``GroupLasso`` other than over the rows of a
tensor of two or more dimensions, keeps the eager code):

==================  =========================================================================================
``l1_gradient``     ``g += a * sign(w)``
``l1_decay``        ``w -= s * sign(w)``
``en_gradient``     ``g += a1 * sign(w)``, then ``g += a2 * w`` (one ``fma``, as torch's ``add(alpha=)``)
``en_decay``        ``w = w * (1 - s2) - s1 * sign(w)`` (``sign`` of the weight before the step)
``group_gradient``  per row: ``c = k / ||w_g||`` (0 where the norm is 0), ``g_g += c * w_g`` (``fma``, as ``addcmul``)
``group_decay``     per row: ``w_g *= 1 - k / ||w_g||`` (``1`` where the norm is 0)
==================  =========================================================================================

The elementwise ones round exactly as the eager code does (bit for bit, tested: ``sign(w) * a`` is exact, and
torch's ``add(alpha=)`` is one ``fma`` on this build); the group ones take the row's norm in the row's own order
while it is in cache, so they equal the eager code to rounding. Built by ``lightreg.base.c_kernels`` at the first step (about 1 s, once per machine: the library is cached on disk),
as the prox kernels are (``lightreg.proximal.fused_prox``), so that a run takes the same steps whether it started
fresh or resumed, and on every rank. ``BUILD_AFTER_ELEMENTS`` (0) delays the build until that many element-steps
have gone through the eager steps (they save about 0.3 ns per element and step on one CPU core); ``math.inf`` never
builds. A compiler that fails is reported once, and the eager code continues.
"""

from __future__ import annotations

import ctypes
import warnings
from typing import Any

import torch
from torch import Tensor
from torch.autograd.graph import increment_version

from lightreg.base.c_kernels import CompileError, load, split

#: Element-steps taken through the eager gradient/decoupled steps before the kernels are built (see above).
BUILD_AFTER_ELEMENTS: float = 0

SOURCE = r"""
#include <math.h>
#include <stdint.h>

#define SIGN(T, x) ((T)((x) > 0) - (T)((x) < 0))
#define DEFINE_MODES(T, S, SQRT, FMA)                                                                          \
void l1_gradient_##S(T *g, const T *w, int64_t n, T a, T unused) {                                            \
    _Pragma("omp simd") for (int64_t i = 0; i < n; ++i) g[i] = g[i] + a * SIGN(T, w[i]);                      \
}                                                                                                              \
void l1_decay_##S(T *w, int64_t n, T s, T unused) {                                                            \
    _Pragma("omp simd") for (int64_t i = 0; i < n; ++i) w[i] = w[i] - s * SIGN(T, w[i]);                      \
}                                                                                                              \
void en_gradient_##S(T *g, const T *w, int64_t n, T a1, T a2) {                                                \
    _Pragma("omp simd") for (int64_t i = 0; i < n; ++i) g[i] = FMA(w[i], a2, g[i] + a1 * SIGN(T, w[i]));     \
}                                                                                                              \
void en_decay_##S(T *w, int64_t n, T s1, T keep) {                                                             \
    _Pragma("omp simd") for (int64_t i = 0; i < n; ++i) w[i] = w[i] * keep - s1 * SIGN(T, w[i]);              \
}                                                                                                              \
static T row_norm_##S(const T *w, int64_t K) {                                                                 \
    T n2 = 0;                                                                                                  \
    _Pragma("omp simd reduction(+:n2)") for (int64_t i = 0; i < K; ++i) n2 += w[i] * w[i];                     \
    return SQRT(n2);                                                                                           \
}                                                                                                              \
void group_gradient_##S(T *g, const T *w, int64_t G, int64_t K, T k) {                                         \
    for (int64_t r = 0; r < G; ++r) {                                                                          \
        const T *wr = w + r * K; T *gr = g + r * K;                                                            \
        T norm = row_norm_##S(wr, K), c = norm > 0 ? k / norm : 0;                                             \
        _Pragma("omp simd") for (int64_t i = 0; i < K; ++i) gr[i] = FMA(wr[i], c, gr[i]);                     \
    }                                                                                                          \
}                                                                                                              \
void group_decay_##S(T *w, int64_t G, int64_t K, T k) {                                                        \
    for (int64_t r = 0; r < G; ++r) {                                                                          \
        T *wr = w + r * K;                                                                                     \
        T norm = row_norm_##S(wr, K), f = 1 - (norm > 0 ? k / norm : 0);                                      \
        _Pragma("omp simd") for (int64_t i = 0; i < K; ++i) wr[i] = wr[i] * f;                                 \
    }                                                                                                          \
}

DEFINE_MODES(float, float, sqrtf, fmaf)
DEFINE_MODES(double, double, sqrt, fma)
"""

_TYPES = {torch.float32: ("float", ctypes.c_float), torch.float64: ("double", ctypes.c_double)}
#: kernel -> (tensors it takes: 2 = (g, w), 1 = (w,); whether it runs over rows)
KERNELS = {"l1_gradient": (2, False), "l1_decay": (1, False), "en_gradient": (2, False), "en_decay": (1, False),
           "group_gradient": (2, True), "group_decay": (1, True)}
_state: dict[Any, Any] = {"eager_elements": 0, "failed": False, "lib": None}  # and (kernel, dtype) -> function


_PLAIN = (Tensor, torch.nn.Parameter)


def _function(name: str, dtype: torch.dtype) -> Any:
    fn = _state.get((name, dtype))
    if fn is None:
        if _state["lib"] is None:
            lib = load("mode_kernels", SOURCE)
            for kernel, (n_tensors, rows) in KERNELS.items():
                for suffix, c in _TYPES.values():
                    f = getattr(lib, f"{kernel}_{suffix}")
                    f.restype = None
                    f.argtypes = [ctypes.c_void_p] * n_tensors + [ctypes.c_int64] * (2 if rows else 1) + [c] * (1 if rows else 2)
            _state["lib"] = lib
        fn = _state[(name, dtype)] = getattr(_state["lib"], f"{name}_{_TYPES[dtype][0]}")
    return fn


def _fusable(tensors: tuple[Tensor, ...], rows: bool) -> bool:
    """Plain, contiguous float32/float64 CPU tensors of one shape and dtype, not aliasing each other (cheap checks:
    this runs once per tensor and step)."""
    w = tensors[-1]
    if type(w) not in _PLAIN or not w.is_cpu or w.dtype not in _TYPES or not w.is_contiguous() or not w.numel():
        return False
    if rows and (w.ndim < 2 or w.numel() == w.shape[0]):
        return False
    if len(tensors) == 1:
        return True
    g = tensors[0]
    return (type(g) in _PLAIN and g.is_cpu and g.dtype == w.dtype and g.shape == w.shape and g.is_contiguous()
            and g.data_ptr() != w.data_ptr())


def run_(name: str, tensors: tuple[Tensor, ...], *coefficients: float) -> bool:
    """Run kernel ``name`` on ``tensors`` (``(g, w)`` or ``(w,)``, in place on the first) if it applies and has paid;
    ``False`` if the caller must take its eager step instead (which this counts toward the build).

    Example:
        >>> g, w = torch.zeros(3), torch.tensor([2.0, -1.0, 0.0])
        >>> ran = run_("l1_gradient", (g, w), 0.5, 0.0) or g.add_(w.sign(), alpha=0.5)  # the kernel, or the eager step
        >>> g
        tensor([ 0.5000, -0.5000,  0.0000])
    """
    n_tensors, rows = KERNELS[name]
    assert len(tensors) == n_tensors
    if _state["failed"] or not _fusable(tensors, rows):
        return False
    if _state["eager_elements"] < BUILD_AFTER_ELEMENTS:
        _state["eager_elements"] += tensors[-1].numel()
        return False
    w = tensors[-1]
    try:
        fn = _function(name, w.dtype)
    except CompileError as error:
        _state["failed"] = True
        warnings.warn(f"lightreg: building the one-pass gradient/decoupled kernels failed ({error}); the eager "
                      "steps are used from now on", stacklevel=3)
        return False
    pointers, size = [t.data_ptr() for t in tensors], w.element_size()
    if rows:  # whole rows to each thread
        k = w[0].numel()
        split(w.shape[0], k, lambda lo, hi: fn(*(p + lo * k * size for p in pointers), hi - lo, k, *coefficients))
    else:
        split(w.numel(), 1, lambda lo, hi: fn(*(p + lo * size for p in pointers), hi - lo, *coefficients))
    increment_version(tensors[0])  # written through a pointer: autograd must still see that it changed
    return True
