"""Group lasso: whole slices of a tensor (units, channels, input features) go to zero together."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightreg._checks import check_int
from lightreg.distributed import local_groups, local_tensor, replicate
from lightreg.penalty import Penalty, Step, accumulation_dtype


class GroupLasso(Penalty):
    """Group lasso ``R(w) = alpha * sum_g sqrt(|g|) * ||w_g||_2`` over the slices ``w_g`` along ``dim``.

    ``|g|`` is the size of one slice. For a ``Linear`` weight ``(out, in)``, ``dim=0`` groups output
    units (rows) and ``dim=1`` input features (columns); for a ``Conv2d`` weight ``dim=0`` groups
    filters. Subgradient ``alpha*sqrt(|g|) * w_g / ||w_g||`` (0 where ``w_g = 0``); proximal step
    ``w_g * max(0, 1 - lr*alpha*sqrt(|g|) / ||w_g||)``, which zeroes a whole group at once.

    Args:
        alpha: strength, a finite float >= 0.
        dim: the dimension whose index names the group; negative counts from the end.

    Example:
        >>> import torch
        >>> w = torch.tensor([[3.0, 4.0], [0.3, 0.4]])
        >>> GroupLasso(1.0, dim=0)(w)  # sqrt(2) * (5 + 0.5)
        tensor(7.7782)
        >>> GroupLasso(0.5, dim=0).prox_(w, 1.0, 0.5); w[1]
        tensor([0., 0.])
    """

    name = "group_lasso"
    makes_zeros = True

    def __init__(self, alpha: float, dim: int = 0) -> None:
        super().__init__(alpha)
        self.dim = check_int("dim", dim)

    def _hparams(self) -> dict[str, float | int | bool]:
        return {"alpha": self.alpha, "dim": self.dim}

    def check_tensor(self, name: str, w: Tensor) -> None:
        super().check_tensor(name, w)
        if w.ndim == 0 or not -w.ndim <= self.dim < w.ndim:
            raise ValueError(f"GroupLasso dim={self.dim} is out of range for {name!r} of shape {tuple(w.shape)}")

    def group_norms(self, w: Tensor) -> Tensor:
        """``||w_g||_2`` for every group, shape ``(w.shape[dim],)``; no temporary of ``w``'s size."""
        dim = self.dim % w.ndim
        others = [d for d in range(w.ndim) if d != dim]
        if not others:
            return w.abs()
        # Under FSDP2 a norm over a sharded dim is a partial DTensor; summing it unresolved is wrong.
        return replicate(torch.linalg.vector_norm(w, ord=2, dim=others))

    def _group_scale(self, w: Tensor) -> float:
        return math.sqrt(w.numel() // max(w.shape[self.dim], 1)) if w.numel() else 0.0

    def _broadcast(self, v: Tensor, w: Tensor) -> Tensor:
        v = local_groups(v, w, self.dim % w.ndim)  # FSDP2: this rank's groups, to scale its local shard
        shape = [1] * w.ndim
        shape[self.dim % w.ndim] = -1
        return v.view(shape)

    def value(self, w: Tensor, alpha: float) -> Tensor:
        self.check_tensor("tensor", w)
        return alpha * self._group_scale(w) * self.group_norms(w).sum(dtype=accumulation_dtype(w))

    def _coefficient(self, w: Tensor, s: float) -> Tensor:
        """``s * sqrt(|g|) / ||w_g||`` per group, ``0`` for an all-zero group (the subgradient's choice)."""
        norms = self.group_norms(w)
        return torch.where(norms > 0, (s * self._group_scale(w)) / norms, torch.zeros_like(norms))

    def gradient(self, w: Tensor, alpha: float) -> Tensor:
        return w * self._broadcast(self._coefficient(w, alpha), w)

    def prox(self, w: Tensor, step: Step, alpha: float) -> Tensor:
        out = w.detach().clone()
        self.prox_(out, step, alpha)
        return out

    def add_gradient_(self, g: Tensor, w: Tensor, alpha: float) -> None:
        local_tensor(g).addcmul_(local_tensor(w), self._broadcast(self._coefficient(w, alpha), w))

    def decay_(self, w: Tensor, step: float, alpha: float) -> None:
        local_tensor(w).mul_(self._broadcast(1.0 - self._coefficient(w, step * alpha), w))

    def prox_(self, w: Tensor, step: Step, alpha: float) -> None:
        if isinstance(step, Tensor):
            raise NotImplementedError("GroupLasso.prox_ with a per-coordinate step")
        # A group whose norm underflows to 0 (float32 entries of ~1e-23) is far below any threshold: the
        # factor 1 - s/0 = -inf clamps to 0 and zeroes it, as it zeroes (keeps) an all-zero group.
        thresholds = (step * alpha * self._group_scale(w)) / self.group_norms(w)
        local_tensor(w).mul_(self._broadcast(thresholds.neg_().add_(1.0).clamp_(min=0.0), w))
