"""GroupLasso's prox in an adaptive optimizer's metric, as one C function per dtype: each group solved in cache.

The eager reference (``GroupLasso._metric_prox_``) makes the bounded step ``t`` as a tensor and then runs Newton's
method with whole-tensor operations: each step is a few passes over the weights, ten and more in all. Solved here
one group at a time, the group's weights ``u`` and steps ``t_i = c / (sqrt(v_i) / d + eps)`` (``v`` floored at
``v̄`` where it is 0, ``c`` where no coordinate has been stepped: ``lightreg.proximal.adaptive_step``) sit in a
buffer of the group's size while Newton runs on them: the weights and ``v`` are read once and the weights written
once, and ``t`` is never a tensor. Per group, with ``λ = alpha * sqrt(|g|)``::

    zero iff ||u / t|| <= λ;  else r_0 = max(||u|| - λ max t, 0),
    r <- r + (s^1.5 - s) / s3,  s = Σ u_i² / (r + λ t_i)²,  s3 = Σ u_i² / (r + λ t_i)³,
    w_i = u_i * r / (r + λ t_i)

Newton's method on the concave, increasing ``r -> s^-1/2`` from ``r_0``, left of the root, increases to the root
(the reference's argument). Instead of a fixed number of steps, it stops when a step no longer increases ``r`` or
moves it by at most one rounding unit of ``r``: the convergence is quadratic, so what is left then is of the order
of that unit squared (``MAX_NEWTON_STEPS`` bounds the loop against rounding noise). The results equal the
reference's to rounding once the reference's fixed steps have converged.

The function is plain C99, built and cached by ``lightreg.base.c_kernels`` and called through ``ctypes``, which
releases the GIL: the groups of a large tensor are split over ``torch.get_num_threads()`` threads.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.autograd.graph import increment_version

from lightreg.base.c_kernels import load, split

#: Safety bound on Newton's steps per group; a group converges in a few (to one rounding unit).
MAX_NEWTON_STEPS = 64

SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define DEFINE_GROUP_PROX(T, NAME, SQRT, UNIT)                                                                 \
int64_t NAME(T *w, const T *v, int64_t A, int64_t G, int64_t B, int64_t g0, int64_t g1, T vbar, T numerator,      \
         T divisor, T eps, T fallback, T lam, int64_t max_steps) {                                             \
    const int64_t K = A * B;                                                                                   \
    const T inv_divisor = 1 / divisor, inv_numerator = 1 / numerator, inv_fallback = 1 / fallback;             \
    T *t = (T *)malloc(sizeof(T) * (size_t)K), *buf = A > 1 ? (T *)malloc(sizeof(T) * (size_t)K) : 0;         \
    if (!t || (A > 1 && !buf)) { free(t); free(buf); return -1; }                                             \
    for (int64_t g = g0; g < g1; ++g) {                                                                        \
        T *u = A > 1 ? buf : w + g * B;                                                                        \
        const T *vg = v + g * B;                                                                               \
        T stepped = (T)INFINITY;  /* min(v_i > 0 ? v_i : 0): 0 iff some v_i is not positive (or NaN) */       \
        for (int64_t a = 0; a < A; ++a) {                                                                      \
            const T *vr = vg + a * G * B;                                                                      \
            T *tr = t + a * B;                                                                                 \
            _Pragma("omp simd reduction(min:stepped)")                                                         \
            for (int64_t b = 0; b < B; ++b) {                                                                  \
                T x = vr[b] > 0 ? vr[b] : vbar;                                                                \
                T m = vr[b] > 0 ? vr[b] : 0;                                                                   \
                stepped = m < stepped ? m : stepped;                                                           \
                tr[b] = x > 0 ? (SQRT(x) * inv_divisor + eps) * inv_numerator : inv_fallback;                  \
            }                                                                                                  \
            if (A > 1)                                                                                         \
                for (int64_t b = 0; b < B; ++b) buf[a * B + b] = w[a * G * B + g * B + b];                     \
        }                                                                                                      \
        if (!(stepped > 0) && vbar < 0) { free(t); free(buf); return g; }  /* the caller computes vbar, resumes */ \
        T n2 = 0, z = 0, amin = (T)INFINITY;                                                                   \
        _Pragma("omp simd reduction(+:n2, z) reduction(min:amin)")                                             \
        for (int64_t k = 0; k < K; ++k) {                                                                      \
            T q = u[k] * t[k];                                                                                 \
            n2 += u[k] * u[k]; z += q * q; amin = t[k] < amin ? t[k] : amin;                                   \
        }                                                                                                      \
        T r = 0;                                                                                               \
        if (z > lam * lam) {                                                                                   \
            r = SQRT(n2) - lam / amin;                                                                         \
            r = r > 0 ? r : 0;                                                                                 \
            for (int64_t step = 0; step < max_steps; ++step) {                                                 \
                T s = 0, s3 = 0;                                                                               \
                _Pragma("omp simd reduction(+:s, s3)")                                                         \
                for (int64_t k = 0; k < K; ++k) {                                                              \
                    T d = t[k] / (r * t[k] + lam), q = u[k] * d;                                               \
                    s += q * q; s3 += q * q * d;                                                               \
                }                                                                                              \
                T next = r + (s * SQRT(s) - s) / s3;                                                           \
                if (!(next > r)) break;                                                                        \
                int done = next - r <= UNIT * next;                                                            \
                r = next;                                                                                      \
                if (done) break;                                                                               \
            }                                                                                                  \
        }                                                                                                      \
        _Pragma("omp simd")                                                                                    \
        for (int64_t k = 0; k < K; ++k) {                                                                      \
            T rt = r * t[k], f = rt / (rt + lam);                                                              \
            u[k] = u[k] * (f == f ? f : 0);                                                                    \
        }                                                                                                      \
        if (A > 1)                                                                                             \
            for (int64_t a = 0; a < A; ++a)                                                                    \
                for (int64_t b = 0; b < B; ++b) w[a * G * B + g * B + b] = buf[a * B + b];                     \
    }                                                                                                          \
    free(t); free(buf);                                                                                        \
    return g1;                                                                                                 \
}

DEFINE_GROUP_PROX(float, group_prox_float, sqrtf, 1.1920929e-07f)
DEFINE_GROUP_PROX(double, group_prox_double, sqrt, 2.220446049250313e-16)
"""

_CTYPES = {torch.float32: ctypes.c_float, torch.float64: ctypes.c_double}
_library: dict[str, Any] = {}


def library() -> Any:
    """The kernels' library, with the functions' signatures set (built at the first call: ``c_kernels.load``)."""
    if "lib" not in _library:
        lib = load("group_prox", SOURCE)
        for dtype, c in _CTYPES.items():
            fn = getattr(lib, f"group_prox_{'float' if dtype == torch.float32 else 'double'}")
            fn.restype = ctypes.c_int64
            fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p] + [ctypes.c_int64] * 5 + [c] * 6 + [ctypes.c_int64]
        _library["lib"] = lib
    return _library["lib"]


def group_prox_(w: Tensor, v: Tensor, dim: int, typical: Callable[[], float], numerator: float, divisor: float,
                eps: float, fallback: float, lam: float) -> None:
    """In place, the prox of ``λ Σ_g ||w_g||`` (groups: the slices along ``dim``) in the metric ``diag(1/t)``,
    ``t_i = numerator / (sqrt(v_i) / divisor + eps)``, ``v_i`` floored at ``v̄ = typical()`` where it is not
    positive, ``t_i = fallback`` where ``v̄`` is not positive either (``AdaptiveStep.bounded``).

    ``typical`` is called only when a group holds an unstepped coordinate (the common case, every ``v_i > 0``, costs
    no extra read of ``v``). ``w`` and ``v``: contiguous CPU tensors of one shape and dtype (float32 or float64);
    ``numerator``, ``divisor`` and ``fallback`` positive.

    Example:
        >>> w = torch.tensor([[3.0, 4.0], [0.3, 0.4]])  # v = 1, so t = 1 / (1 + 0) = 1: the closed form 1 - λ / ||w_g||
        >>> group_prox_(w, torch.ones(2, 2), 0, lambda: 1.0, 1.0, 1.0, 0.0, 1.0, lam=1.0); w
        tensor([[2.4000, 3.2000],
                [0.0000, 0.0000]])
    """
    assert w.device.type == "cpu" and w.dtype in _CTYPES and w.is_contiguous() and v.is_contiguous()
    assert v.shape == w.shape and v.dtype == w.dtype and w.ndim >= 1 and numerator > 0 and fallback > 0
    dim %= w.ndim
    A, G, B = torch.Size(w.shape[:dim]).numel(), int(w.shape[dim]), torch.Size(w.shape[dim + 1:]).numel()
    fn = getattr(library(), "group_prox_float" if w.dtype == torch.float32 else "group_prox_double")
    ranges, vbar = [(0, G)], -1.0  # v̄ = -1: not known yet

    def run(lo: int, hi: int) -> int:
        return fn(w.data_ptr(), v.data_ptr(), A, G, B, lo, hi, vbar, numerator, divisor, eps, fallback, lam,
                  MAX_NEWTON_STEPS)

    for _ in range(2):  # a second round only with v̄ known, from the groups where the first stopped
        stopped = []
        for lo, hi in ranges:
            parts = split(hi - lo, A * B, lambda a, b: (run(lo + a, lo + b), lo + b))
            if min(stop for stop, _ in parts) < 0:
                raise MemoryError(f"the group prox could not allocate two buffers of {A * B} elements")
            stopped += [(stop, end) for stop, end in parts if stop < end]
        if not stopped:
            increment_version(w)  # written through a pointer: autograd must still see that it changed
            return
        ranges, vbar = stopped, max(float(typical()), 0.0)
    raise AssertionError(f"the group prox stopped at groups {ranges} with v̄ = {vbar}")
