"""The L0 penalty: a cost per nonzero weight, whose proximal step is a hard threshold."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightreg.base.dtypes import accumulation_dtype
from lightreg.penalties.contract import Penalty, Step


class L0(Penalty):
    """``R(w) = alpha * #{i : w_i != 0}``, the number of nonzero weights (non-convex).

    Its proximal step is a hard threshold, per coordinate when the step ``t`` is a tensor::

        prox_{tR}(w)_i = w_i  if |w_i| > sqrt(2 * t_i * alpha)  else 0

    (keeping ``w_i`` costs ``alpha``, zeroing it costs ``w_i² / (2 t_i)``). Survivors are not shrunk, so
    there is no lasso bias. ``R`` is piecewise constant: its gradient is 0 wherever it exists, so L0 works
    in mode ``"proximal"`` only; ``gradient`` and ``decay_`` raise ``ValueError``. ``value`` is the count
    times alpha, a tensor without an autograd graph (adding it to a loss changes no gradient).

    Args:
        alpha: the cost of one nonzero weight, a finite float >= 0.

    Example:
        >>> L0(0.5)(torch.tensor([1.0, 0.0, -3.0]))
        tensor(1.)
        >>> w = torch.tensor([1.0, -0.2, 0.5]); L0(0.5).prox_(w, 0.25, 0.5); w  # threshold sqrt(0.25) = 0.5
        tensor([1., 0., 0.])
    """

    name = "l0"
    separable = True
    makes_zeros = True
    proximal_only = True

    def value(self, w: Tensor, alpha: float) -> Tensor:
        # (w != 0).sum also works on a DTensor (a direct call), where count_nonzero has no sharding rule.
        return (w != 0).sum(dtype=accumulation_dtype(w)) * alpha

    def gradient(self, w: Tensor, alpha: float) -> Tensor:
        raise ValueError("L0 has no gradient (R is piecewise constant): use it with mode='proximal'")

    def decay_(self, w: Tensor, step: float, alpha: float) -> None:
        raise ValueError("L0 has no decoupled step (R is piecewise constant): use it with mode='proximal'")

    def zero_levels(self, w: Tensor, step: Step) -> Tensor:
        return w.square().div_(step).mul_(0.5).reshape(-1)  # w² / t <= 2 alpha, the comparison prox_ makes

    def prox(self, w: Tensor, step: Step, alpha: float) -> Tensor:
        out = w.detach().clone()
        self.prox_(out, step, alpha)
        return out

    def prox_(self, w: Tensor, step: Step, alpha: float) -> None:
        if not isinstance(step, Tensor):
            # ATen's hardshrink is exactly "w if |w| > lambda else 0": one read and one write, no temporary.
            torch.ops.aten.hardshrink.out(w, math.sqrt(2.0 * step * alpha), out=w)
            return
        # |w| > sqrt(2 t alpha)  <=>  w² / t > 2 alpha: the same expression as zero_levels. The comparison is
        # written into the one temporary as 1.0 / 0.0, so w * it keeps survivors bit for bit.
        w.mul_(w.square().div_(step).gt_(2.0 * alpha))
