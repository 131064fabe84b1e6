"""The elementwise penalties L1, L2 and elastic net, in scikit-learn's parameterisation.

Each is a sum of one term per entry, ``R(w) = Σ_i r(w_i)``, written as the plain tensor functions of the
``Penalty`` contract (``lightreg.penalties.contract``): the differentiable value, the (sub)gradient, the proximal step,
each with a fused in-place form. The ``Regularizer`` callback only decides when to call them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lightreg.base.checks import check_real
from lightreg.base.dtypes import accumulation_dtype
from lightreg.penalties.contract import Penalty, Step
from lightreg.penalties.mode_kernels import run_


def use_foreach(tensors: Sequence[Tensor]) -> bool:
    """Fused ``torch._foreach_*`` kernels pay off on accelerators; on CPU a plain loop is as fast.

    Plain tensors only: the ``Regularizer`` hands these separable penalties local shards, never ``DTensor``s,
    but a direct call with ``DTensor``s takes the per-tensor path, whose elementwise ops act on each shard.
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
    return w.abs().sum(dtype=accumulation_dtype(w))


def _squared_l2(w: Tensor) -> Tensor:
    return torch.linalg.vector_norm(w, ord=2, dtype=accumulation_dtype(w)).square()


def soft_threshold_(w: Tensor, threshold: Step, scale: float = 1.0) -> Tensor:
    """In place ``sign(w) * max(|w| - scale * threshold, 0)``: exact zeros where ``|w| <= scale * threshold``.

    A float threshold uses ATen's ``softshrink`` written into ``w``: one read and one write of the
    tensor, the least an in-place update can cost. A per-coordinate threshold (a tensor) takes one
    temporary of ``w``'s size (``scale`` is folded in, so ``scale * threshold`` is never made). Some zeros
    may come out as ``-0.0``, which equals ``0`` in every comparison and count.

    Example:
        >>> soft_threshold_(torch.tensor([3.0, -0.5, 1.0]), torch.tensor([1.0, 1.0, 2.0]))
        tensor([2., -0., 0.])
    """
    if not isinstance(threshold, Tensor):
        # Any finite |w| <= finfo.max, so thresholding at the dtype's max is exact where lr*alpha would overflow it.
        threshold = min(threshold * scale, torch.finfo(w.dtype).max)
        return torch.ops.aten.softshrink.out(w, threshold, out=w)
    return w.copy_(w.abs().sub_(threshold, alpha=scale).clamp_(min=0.0).copysign_(w))


def soft_threshold(w: Tensor, threshold: Step) -> Tensor:
    """``sign(w) * max(|w| - threshold, 0)`` as a new tensor (differentiable where it is smooth)."""
    return w.abs().sub(threshold).clamp(min=0.0).copysign(w)


def _scale_(w: Tensor, step: Step, c: float) -> Tensor:
    """In place ``w / (1 + step * c)``; a tensor ``step`` takes one temporary of its size."""
    if c == 0.0:
        return w
    if isinstance(step, Tensor):
        return w.div_(torch.mul(step, c).add_(1.0))
    return w.mul_(1.0 / (1.0 + step * c))


class L1(Penalty):
    """Lasso penalty ``R(w) = alpha * sum|w|``.

    Subgradient ``alpha * sign(w)``; proximal step soft-thresholding at ``step * alpha`` (per
    coordinate when ``step`` is a tensor), the only way to get exact zeros. Keras ``l1(x)`` is
    ``L1(alpha=x)``; scikit-learn ``Lasso(alpha)`` is the same alpha with loss ``mean((y - Xw)²) / 2``.

    Args:
        alpha: strength, a finite float >= 0.

    Example:
        >>> L1(0.5)(torch.tensor([1.0, -2.0, 0.0]))
        tensor(1.5000)
        >>> w = torch.tensor([1.0, -0.2, 0.3]); L1(0.5).prox_(w, 1.0, 0.5); w.tolist()
        [0.5, -0.0, 0.0]
    """

    name = "l1"
    separable = True
    makes_zeros = True

    def value(self, w: Tensor, alpha: float) -> Tensor:
        return alpha * _l1_norm(w)

    def gradient(self, w: Tensor, alpha: float) -> Tensor:
        return alpha * w.sign()

    def prox(self, w: Tensor, step: Step, alpha: float) -> Tensor:
        return soft_threshold(w, step * alpha)

    def zero_levels(self, w: Tensor, step: Step) -> Tensor:
        return w.abs().div_(step).reshape(-1)  # |w| <= step * alpha

    def add_gradient_(self, g: Tensor, w: Tensor, alpha: float) -> None:
        if not run_("l1_gradient", (g, w), alpha, 0.0):  # one pass (mode_kernels), once it pays
            g.add_(w.sign(), alpha=alpha)

    def decay_(self, w: Tensor, step: float, alpha: float) -> None:
        if not run_("l1_decay", (w,), step * alpha, 0.0):
            w.sub_(w.sign(), alpha=step * alpha)

    def prox_(self, w: Tensor, step: Step, alpha: float) -> None:
        soft_threshold_(w, step, scale=alpha)

    def apply_prox_(self, params: Sequence[Tensor], steps: Step | Sequence[Step], alpha: float | None = None) -> None:
        alpha = self.alpha if alpha is None else alpha
        if not (isinstance(steps, (int, float)) and use_foreach(params)):
            return super().apply_prox_(params, steps, alpha)
        s = min(steps * alpha, min(torch.finfo(p.dtype).max for p in params))  # as in soft_threshold_
        if s == 0.0:
            return
        for run in chunk_by_numel(params):
            clamped = torch._foreach_clamp_min(params[run], -s)
            torch._foreach_clamp_max_(clamped, s)
            torch._foreach_sub_(params[run], clamped)


class L2(Penalty):
    """Ridge penalty ``R(w) = (alpha / 2) * sum w²``.

    Gradient ``alpha * w``, so mode ``gradient`` equals torch ``weight_decay=alpha`` and mode
    ``decoupled`` with Adam equals ``AdamW(weight_decay=alpha)``. Proximal step ``w / (1 + step*alpha)``.
    Keras ``l2(x)`` is ``L2(alpha=2 * x)`` (Keras has no ½).

    Args:
        alpha: strength, a finite float >= 0.

    Example:
        >>> L2(0.5)(torch.tensor([1.0, -2.0]))
        tensor(1.2500)
        >>> w = torch.tensor([3.0, -1.5]); L2(0.5).prox_(w, 1.0, 0.5); w
        tensor([ 2., -1.])
    """

    name = "l2"
    separable = True

    @property
    def l2_part(self) -> bool:
        return self.alpha > 0

    def value(self, w: Tensor, alpha: float) -> Tensor:
        return 0.5 * alpha * _squared_l2(w)

    def gradient(self, w: Tensor, alpha: float) -> Tensor:
        return alpha * w

    def prox(self, w: Tensor, step: Step, alpha: float) -> Tensor:
        return w / (1.0 + step * alpha)

    def add_gradient_(self, g: Tensor, w: Tensor, alpha: float) -> None:
        g.add_(w, alpha=alpha)

    def decay_(self, w: Tensor, step: float, alpha: float) -> None:
        w.mul_(1.0 - step * alpha)

    def prox_(self, w: Tensor, step: Step, alpha: float) -> None:
        _scale_(w, step, alpha)

    def apply_gradient_(self, grads: Sequence[Tensor], params: Sequence[Tensor], alpha: float | None = None) -> None:
        alpha = self.alpha if alpha is None else alpha
        if use_foreach(params) and alpha != 0.0:
            torch._foreach_add_(list(grads), list(params), alpha=alpha)
        else:
            super().apply_gradient_(grads, params, alpha)

    def apply_decay_(self, params: Sequence[Tensor], lr: float, alpha: float | None = None) -> None:
        alpha = self.alpha if alpha is None else alpha
        if use_foreach(params) and lr * alpha != 0.0:
            torch._foreach_mul_(list(params), 1.0 - lr * alpha)
        else:
            super().apply_decay_(params, lr, alpha)

    def apply_prox_(self, params: Sequence[Tensor], steps: Step | Sequence[Step], alpha: float | None = None) -> None:
        alpha = self.alpha if alpha is None else alpha
        if isinstance(steps, (int, float)) and use_foreach(params) and steps * alpha != 0.0:
            torch._foreach_mul_(list(params), 1.0 / (1.0 + steps * alpha))
        else:
            super().apply_prox_(params, steps, alpha)


class ElasticNet(Penalty):
    """Elastic net ``R(w) = alpha*rho * sum|w| + (alpha*(1 - rho)/2) * sum w²`` with ``rho = l1_ratio``.

    Exactly scikit-learn's ``ElasticNet(alpha, l1_ratio)`` penalty (with loss ``mean((y - Xw)²) / 2``).
    Subgradient ``alpha*rho*sign(w) + alpha*(1 - rho)*w``; proximal step
    ``soft_threshold(w, step*alpha*rho) / (1 + step*alpha*(1 - rho))``.

    Args:
        alpha: strength, a finite float >= 0.
        l1_ratio: mix ``rho`` in [0, 1]; 1 is ``L1(alpha)``, 0 is ``L2(alpha)``.

    Example:
        >>> ElasticNet(1.0, l1_ratio=0.5)(torch.tensor([2.0, 0.0]))
        tensor(2.)
        >>> w = torch.tensor([2.0, 0.25]); ElasticNet(1.0, 0.5).prox_(w, 1.0, 1.0); w
        tensor([1., 0.])
    """

    name = "elastic_net"
    separable = True

    def __init__(self, alpha: float, l1_ratio: float = 0.5) -> None:
        super().__init__(alpha)
        self.l1_ratio = check_real("l1_ratio", l1_ratio, low=0.0, high=1.0)

    def _hparams(self) -> dict[str, float | int | bool]:
        return {"alpha": self.alpha, "l1_ratio": self.l1_ratio}

    @property
    def makes_zeros(self) -> bool:  # type: ignore[override]
        return self.l1_ratio > 0

    @property
    def l2_part(self) -> bool:
        return self.alpha > 0 and self.l1_ratio < 1.0

    def value(self, w: Tensor, alpha: float) -> Tensor:
        rho = self.l1_ratio
        return alpha * rho * _l1_norm(w) + 0.5 * alpha * (1.0 - rho) * _squared_l2(w)

    def gradient(self, w: Tensor, alpha: float) -> Tensor:
        return alpha * self.l1_ratio * w.sign() + alpha * (1.0 - self.l1_ratio) * w

    def prox(self, w: Tensor, step: Step, alpha: float) -> Tensor:
        rho = self.l1_ratio
        # Each part only where it exists: an infinite step times a zero weight would be a NaN threshold.
        out = soft_threshold(w, step * (alpha * rho)) if rho > 0.0 else w.clone()
        return out / (1.0 + step * (alpha * (1.0 - rho))) if rho < 1.0 else out

    def zero_levels(self, w: Tensor, step: Step) -> Tensor:
        if self.l1_ratio == 0:
            return super().zero_levels(w, step)
        return w.abs().div_(step).div_(self.l1_ratio).reshape(-1)  # |w| <= step * alpha * rho

    def add_gradient_(self, g: Tensor, w: Tensor, alpha: float) -> None:
        if not run_("en_gradient", (g, w), alpha * self.l1_ratio, alpha * (1.0 - self.l1_ratio)):
            g.add_(w.sign(), alpha=alpha * self.l1_ratio).add_(w, alpha=alpha * (1.0 - self.l1_ratio))

    def decay_(self, w: Tensor, step: float, alpha: float) -> None:
        # sign(w) is taken before w moves; scaling by a positive factor first would not change it.
        s, rho = step * alpha, self.l1_ratio
        if run_("en_decay", (w,), s * rho, 1.0 - s * (1.0 - rho)):
            return
        sign = w.sign()
        w.mul_(1.0 - s * (1.0 - rho)).sub_(sign, alpha=s * rho)

    def prox_(self, w: Tensor, step: Step, alpha: float) -> None:
        rho = self.l1_ratio
        if rho > 0.0:
            soft_threshold_(w, step, scale=alpha * rho)
        _scale_(w, step, alpha * (1.0 - rho))
