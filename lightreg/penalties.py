"""Elementwise penalties L1, L2 and elastic net, in scikit-learn's parameterisation.

Each penalty is three plain tensor functions that know nothing of Lightning (see ``penalty.py``): the
differentiable value ``R(w)``, the (sub)gradient added into gradients, and the in-place proximal step.
The callback in ``regularizer.py`` only decides when to call them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lightreg._checks import check_real
from lightreg.penalty import Penalty


def use_foreach(tensors: Sequence[Tensor]) -> bool:
    """Fused ``torch._foreach_*`` kernels pay off on accelerators; on CPU a plain loop is as fast.

    DTensors (FSDP2) keep the per-tensor path, whose elementwise ops act on the local shard.
    """
    return bool(tensors) and all(type(t) is Tensor or type(t) is torch.nn.Parameter for t in tensors) and (
        tensors[0].device.type != "cpu"
    )


def chunk_by_numel(tensors: Sequence[Tensor]) -> list[slice]:
    """Split ``tensors`` into runs whose total size is at most that of the largest tensor.

    A fused op over a run that needs a temporary then never needs more than the largest tensor does.
    """
    budget = max((t.numel() for t in tensors), default=0)
    runs, start, size = [], 0, 0
    for i, t in enumerate(tensors):
        if size + t.numel() > budget and i > start:
            runs.append(slice(start, i))
            start, size = i, 0
        size += t.numel()
    if start < len(tensors):
        runs.append(slice(start, len(tensors)))
    return runs


def _l1_norm(w: Tensor) -> Tensor:
    # On CPU abs().sum() is ~6x faster than vector_norm(ord=1), for one temporary of w's size.
    return w.abs().sum()


def _squared_l2(w: Tensor) -> Tensor:
    return torch.linalg.vector_norm(w, ord=2).square()


def soft_threshold_(w: Tensor, s: float) -> Tensor:
    """In place ``sign(w) * max(|w| - s, 0)``: exact zeros where ``|w| <= s``.

    ATen's ``softshrink`` written into ``w`` is one read and one write of the tensor, the least an
    in-place update can cost (``w - clamp(w, -s, s)`` is the same figure in two kernels and a
    temporary). Some zeros may come out as ``-0.0``, which equals ``0`` in every comparison and count.
    """
    return torch.ops.aten.softshrink.out(w, s, out=w)


class L1(Penalty):
    """Lasso penalty ``R(w) = alpha * sum|w|``.

    Subgradient ``alpha * sign(w)``; proximal step soft-thresholding at ``lr * alpha``, the only way
    to get exact zeros. Keras ``l1(x)`` is ``L1(alpha=x)``; scikit-learn ``Lasso(alpha)`` is the same
    alpha with loss ``mean((y - Xw)²) / 2``.

    Args:
        alpha: strength, a finite float >= 0.

    Example:
        >>> import torch
        >>> L1(0.5)(torch.tensor([1.0, -2.0, 0.0]))
        tensor(1.5000)
        >>> w = torch.tensor([1.0, -0.2, 0.3]); L1(0.5).prox_([w], lr=1.0); w.tolist()
        [0.5, -0.0, 0.0]
    """

    name = "l1"
    elementwise = True

    def value(self, w: Tensor, alpha: float) -> Tensor:
        return alpha * _l1_norm(w)

    def _grad_one(self, g: Tensor, w: Tensor, alpha: float) -> None:
        g.add_(w.sign(), alpha=alpha)

    def _decay_one(self, w: Tensor, s: float) -> None:
        w.sub_(w.sign(), alpha=s)

    def _prox_one(self, w: Tensor, s: float) -> None:
        soft_threshold_(w, s)

    def _prox_all(self, params: list[Tensor], s: float) -> None:
        if not use_foreach(params):
            return super()._prox_all(params, s)
        for run in chunk_by_numel(params):
            clamped = torch._foreach_clamp_min(params[run], -s)
            torch._foreach_clamp_max_(clamped, s)
            torch._foreach_sub_(params[run], clamped)


class L2(Penalty):
    """Ridge penalty ``R(w) = (alpha / 2) * sum w²``.

    Gradient ``alpha * w``, so mode ``gradient`` equals torch ``weight_decay=alpha`` and mode
    ``decoupled`` with Adam equals ``AdamW(weight_decay=alpha)``. Proximal step ``w / (1 + lr*alpha)``.
    Keras ``l2(x)`` is ``L2(alpha=2 * x)`` (Keras has no ½).

    Args:
        alpha: strength, a finite float >= 0.

    Example:
        >>> import torch
        >>> L2(0.5)(torch.tensor([1.0, -2.0]))
        tensor(1.2500)
        >>> w = torch.tensor([3.0, -1.5]); L2(0.5).prox_([w], lr=1.0); w
        tensor([ 2., -1.])
    """

    name = "l2"
    elementwise = True

    @property
    def l2_part(self) -> bool:
        return self.alpha > 0

    def value(self, w: Tensor, alpha: float) -> Tensor:
        return 0.5 * alpha * _squared_l2(w)

    def _grad_all(self, grads: list[Tensor], params: list[Tensor], alpha: float) -> None:
        if use_foreach(params):
            torch._foreach_add_(grads, params, alpha=alpha)
        else:
            super()._grad_all(grads, params, alpha)

    def _decay_all(self, params: list[Tensor], s: float) -> None:
        if use_foreach(params):
            torch._foreach_mul_(params, 1.0 - s)
        else:
            super()._decay_all(params, s)

    def _prox_all(self, params: list[Tensor], s: float) -> None:
        if use_foreach(params):
            torch._foreach_mul_(params, 1.0 / (1.0 + s))
        else:
            super()._prox_all(params, s)

    def _grad_one(self, g: Tensor, w: Tensor, alpha: float) -> None:
        g.add_(w, alpha=alpha)

    def _decay_one(self, w: Tensor, s: float) -> None:
        w.mul_(1.0 - s)

    def _prox_one(self, w: Tensor, s: float) -> None:
        w.mul_(1.0 / (1.0 + s))


class ElasticNet(Penalty):
    """Elastic net ``R(w) = alpha*rho * sum|w| + (alpha*(1 - rho)/2) * sum w²`` with ``rho = l1_ratio``.

    Exactly scikit-learn's ``ElasticNet(alpha, l1_ratio)`` penalty (with loss ``mean((y - Xw)²) / 2``).
    Subgradient ``alpha*rho*sign(w) + alpha*(1 - rho)*w``; proximal step
    ``soft_threshold(w, lr*alpha*rho) / (1 + lr*alpha*(1 - rho))``.

    Args:
        alpha: strength, a finite float >= 0.
        l1_ratio: mix ``rho`` in [0, 1]; 1 is ``L1(alpha)``, 0 is ``L2(alpha)``.

    Example:
        >>> import torch
        >>> ElasticNet(1.0, l1_ratio=0.5)(torch.tensor([2.0, 0.0]))
        tensor(2.)
        >>> w = torch.tensor([2.0, 0.25]); ElasticNet(1.0, 0.5).prox_([w], lr=1.0); w
        tensor([1., 0.])
    """

    name = "elastic_net"
    elementwise = True

    def __init__(self, alpha: float, l1_ratio: float = 0.5) -> None:
        super().__init__(alpha)
        self.l1_ratio = check_real("l1_ratio", l1_ratio, low=0.0, high=1.0)

    def _hparams(self) -> dict[str, float | int]:
        return {"alpha": self.alpha, "l1_ratio": self.l1_ratio}

    @property
    def l2_part(self) -> bool:
        return self.alpha > 0 and self.l1_ratio < 1.0

    def value(self, w: Tensor, alpha: float) -> Tensor:
        rho = self.l1_ratio
        return alpha * rho * _l1_norm(w) + 0.5 * alpha * (1.0 - rho) * _squared_l2(w)

    def _grad_one(self, g: Tensor, w: Tensor, alpha: float) -> None:
        g.add_(w.sign(), alpha=alpha * self.l1_ratio).add_(w, alpha=alpha * (1.0 - self.l1_ratio))

    def _decay_one(self, w: Tensor, s: float) -> None:
        # sign(w) is taken before w moves; scaling by a positive factor first would not change it.
        sign = w.sign()
        w.mul_(1.0 - s * (1.0 - self.l1_ratio)).sub_(sign, alpha=s * self.l1_ratio)

    def _prox_one(self, w: Tensor, s: float) -> None:
        soft_threshold_(w, s * self.l1_ratio).mul_(1.0 / (1.0 + s * (1.0 - self.l1_ratio)))
