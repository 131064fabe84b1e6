"""A safe per-coordinate step: an adaptive optimizer's ``t_i = c / (sqrt(v_i) / d + eps)``, bounded by the tensor's typical one.

An adaptive optimizer moves coordinate ``i`` by ``t_i`` times its gradient estimate, ``t_i = c / (sqrt(v_i) / d + eps)``
(Adam: ``c = lr``, ``v = exp_avg_sq``, ``d = sqrt(1 - beta2^k)``). Where the optimizer has never seen a nonzero
gradient, ``v_i = 0`` exactly and ``t_i = c / eps``, 1e5 x ``lr`` with Adam's defaults, so a prox in that metric
would wipe the coordinate in one step (an embedding's unseen rows, a feature that is always 0) although the
optimizer never moved it.

The bound: a coordinate the optimizer has not stepped (``v_i = 0``) takes the tensor's typical step, that of the
mean second moment of the coordinates it has stepped, ``v̄ = mean(v_j : v_j > 0)`` over the whole tensor (all
shards)::

    t_i = c / (sqrt(v_i) / d + eps)   where v_i > 0      (the optimizer's own step, unchanged)
    t_i = c / (sqrt(v̄) / d + eps)     where v_i = 0      (c, the plain step, while no coordinate has v > 0)

Why this keeps the fixed points: on a stepped coordinate nothing changes, so "optimizer step, then prox" keeps the
stationary points of ``loss + R`` (ProxGen; scikit-learn's ``Lasso`` with Adam). On an unstepped one the
optimizer's move is 0 (its gradient has always been 0, so ``m = 0``) and the iteration there is the plain proximal
iteration ``w_i <- prox_{s R}(w_i)`` with a positive step ``s``, whose fixed points do not depend on ``s``: the
minimisers of ``R`` on that coordinate, 0 for ``L1`` (a weight whose feature is always zero ends at exactly 0,
pulled by ``s * alpha`` per step). A step with ``c = 0`` (``lr = 0``) is 0: the prox is then the identity.
The mean of ``v`` over the stepped coordinates is conservative: the large second moments weigh most, so ``s`` is at
most the step of a coordinate of typical gradient size.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from lightreg.base.dtypes import accumulation_dtype
from lightreg.base.distributed import is_dtensor, local_tensor, replicate


class AdaptiveStep(NamedTuple):
    """``t = numerator / (sqrt(v) / divisor + eps)`` for ``v = second_moment``, ``v`` replaced by ``typical`` where it is 0.

    ``second_moment`` is this rank's shard (a plain tensor) and ``mean`` the typical second moment of the whole
    tensor (a 0-d tensor), or ``None``: then :meth:`typical` takes it from ``second_moment`` itself (a plain,
    unsharded tensor). ``numerator`` and ``divisor`` are floats or 0-d tensors (a step count kept on the device);
    ``fallback`` is the plain step, taken where no coordinate has been stepped.
    """

    numerator: float | Tensor
    second_moment: Tensor
    divisor: float | Tensor
    eps: float
    fallback: float
    mean: Tensor | None = None

    def typical(self) -> Tensor:
        """``v̄ = mean(v_j : v_j > 0)`` (0 when every ``v_j`` is 0), a 0-d tensor of ``second_moment``'s dtype."""
        if self.mean is not None:
            return self.mean
        return typical_second_moment(self.second_moment.sum(dtype=accumulation_dtype(self.second_moment)),
                                     self.second_moment.count_nonzero()).to(self.second_moment.dtype)

    def bounded(self) -> Tensor:
        """The bounded step, a new tensor shaped like ``second_moment`` (the eager reference of the fused kernels).

        Example:
            >>> AdaptiveStep(0.1, torch.tensor([0.0, 4.0, 16.0]), 1.0, 0.0, 0.1).bounded()  # v̄ = 10 for v = 0
            tensor([0.0316, 0.0500, 0.0250])
        """
        v = self.second_moment
        if v.device.type == "cpu" and v.numel():
            # The common case, checked for the price of one read (free on the CPU): no unstepped coordinate, whose
            # denominator would be exactly eps. Then t is the optimizer's own step, in place in one temporary.
            # Compared on v itself: a denominator sqrt(0)/d + eps rounded to float32 can exceed the float eps.
            if v.min().item() > 0:
                return v.sqrt().div_(self.divisor).add_(self.eps).reciprocal_().mul_(self.numerator)
        vbar = self.typical()
        t = torch.where(v > 0, v, vbar)
        t.sqrt_().div_(self.divisor).add_(self.eps).reciprocal_().mul_(self.numerator)
        # v̄ = 0: no coordinate stepped, every v is 0. On the CPU reading v̄ is free, and saves a pass; on an
        # accelerator a 0-d mask keeps it free of host syncs.
        if vbar.device.type != "cpu":
            return t.masked_fill_(vbar <= 0, self.fallback)
        return t.fill_(self.fallback) if vbar.item() <= 0 else t

    def unbounded(self) -> Tensor:
        """The optimizer's own step ``numerator / (sqrt(v) / divisor + eps)``, unbounded (for tests and reports)."""
        t = self.second_moment.sqrt().div_(self.divisor).add_(self.eps)
        return t.reciprocal_().mul_(self.numerator)


def typical_second_moment(total: Tensor, stepped: Tensor) -> Tensor:
    """``total / stepped``, or 0 when ``stepped`` is 0: the mean second moment of the stepped coordinates."""
    return total / stepped.clamp(min=1).to(total.dtype)


def whole_mean(v: Tensor) -> Tensor | None:
    """The typical second moment of a sharded (``DTensor``) ``v`` over all ranks, as a plain 0-d tensor; ``None`` for a
    plain tensor, whose typical value the step (or its fused kernel) takes itself."""
    if not is_dtensor(v):
        return None
    total = local_tensor(replicate(v.sum(dtype=accumulation_dtype(v))))
    stepped = local_tensor(replicate((v > 0).sum()))
    return typical_second_moment(total, stepped).to(v.dtype)


def adaptive_step(numerator: float | Tensor, v: Tensor, divisor: float | Tensor, eps: float, fallback: float) -> AdaptiveStep:
    """An :class:`AdaptiveStep` over the optimizer state ``v`` (a plain tensor or a ``DTensor``)."""
    return AdaptiveStep(numerator, local_tensor(v), divisor, eps, fallback, whole_mean(v))
