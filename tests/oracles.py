"""The penalties written out from their formulas (docs/conventions.md's table) with plain loops and sums: the oracle the library is tested against."""

import math

import torch

from lightreg import L1, L2, ElasticNet, GroupLasso


def explicit_value(penalty, w):
    """R(w) written out from its formula, independently of the library's implementation."""
    a = penalty.alpha
    if isinstance(penalty, L1):
        return a * w.abs().sum()
    if isinstance(penalty, L2):
        return a / 2 * (w * w).sum()
    if isinstance(penalty, ElasticNet):
        r = penalty.l1_ratio
        return a * r * w.abs().sum() + a * (1 - r) / 2 * (w * w).sum()
    if isinstance(penalty, GroupLasso):
        dim = penalty.dim % w.ndim
        slices = [w.select(dim, i) for i in range(w.shape[dim])]
        return sum(a * math.sqrt(g.numel()) * torch.sqrt((g * g).sum()) for g in slices)
    raise AssertionError(penalty)


def explicit_prox(penalty, w, t):
    """Closed-form prox_{tR}(w), element by element / group by group, with plain Python loops."""
    out = w.clone()
    if isinstance(penalty, GroupLasso):
        dim = penalty.dim % w.ndim
        for i in range(w.shape[dim]):
            g = w.select(dim, i)
            norm = math.sqrt(float((g * g).sum()))
            thr = t * penalty.alpha * math.sqrt(g.numel())
            scale = 0.0 if norm <= thr else 1 - thr / norm
            out.select(dim, i).copy_(g * scale)
        return out
    l1 = {L1: 1.0, L2: 0.0}.get(type(penalty), getattr(penalty, "l1_ratio", None))
    flat = out.view(-1)
    for i, x in enumerate(w.reshape(-1).tolist()):
        shrunk = math.copysign(max(abs(x) - t * penalty.alpha * l1, 0.0), x)
        flat[i] = shrunk / (1 + t * penalty.alpha * (1 - l1))
    return out
