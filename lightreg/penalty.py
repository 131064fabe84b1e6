"""The ``Penalty`` base: ``R(w)`` summed over tensors, its gradient and its proximal operator.

Every operation is a plain tensor function. R is linear in alpha, so the decoupled step depends on
``lr * alpha`` alone and so does the proximal step; both receive that product, ``s``, which keeps the
hot path free of per-tensor scalar work.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from lightreg._checks import check_real


def _as_tensor_list(tensors: Tensor | Iterable[Tensor]) -> list[Tensor]:
    if isinstance(tensors, Tensor):
        return [tensors]
    tensors = list(tensors)
    for t in tensors:
        if not isinstance(t, Tensor):
            raise TypeError(f"tensors must be tensors, got {type(t).__name__} in the iterable")
    return tensors


class Penalty:
    """Base of every penalty: ``R(w)`` summed over tensors, its gradient and its proximal operator.

    Subclasses implement the per-tensor ``value``, ``_grad_one``, ``_decay_one`` and ``_prox_one``;
    ``name`` is the default metric name (``reg/<name>/penalty``).

    Args:
        alpha: strength, a finite float >= 0.
    """

    name = "penalty"
    #: ``R`` is a sum of per-element terms, so every operation may act on each shard of a sharded tensor alone.
    elementwise = False

    def __init__(self, alpha: float) -> None:
        self.alpha = check_real("alpha", alpha)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._hparams().items())
        return f"{type(self).__name__}({args})"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self._hparams() == other._hparams()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self), tuple(self._hparams().items())))

    def _hparams(self) -> dict[str, float | int]:
        return {"alpha": self.alpha}

    @property
    def l2_part(self) -> bool:
        """Whether the penalty contains a squared-norm (weight-decay-like) term."""
        return False

    def __call__(self, tensors: Tensor | Iterable[Tensor], alpha: float | None = None) -> Tensor:
        """Differentiable ``sum_w R(w)``, so ``loss + penalty(model.parameters())`` works."""
        alpha = self.alpha if alpha is None else alpha
        tensors = _as_tensor_list(tensors)
        if not tensors:
            raise ValueError("tensors is empty: there is nothing to penalise")
        return torch.stack([self.value(w, alpha) for w in tensors]).sum()

    def value(self, w: Tensor, alpha: float) -> Tensor:
        """``R(w)`` of one tensor at strength ``alpha`` (differentiable)."""
        raise NotImplementedError

    def check_tensor(self, name: str, w: Tensor) -> None:
        """Raise ``ValueError`` if the penalty cannot apply to ``w``; called before any weight changes."""

    def add_grad_(self, grads: Sequence[Tensor], params: Sequence[Tensor], alpha: float | None = None) -> None:
        """In place ``g += ∇R(w)`` for each pair (the gradient of ``R`` added to the loss's)."""
        alpha = self.alpha if alpha is None else alpha
        if alpha != 0.0:
            self._grad_all(list(grads), list(params), alpha)

    def decay_(self, params: Sequence[Tensor], lr: float, alpha: float | None = None) -> None:
        """In place decoupled step ``w -= lr * ∇R(w)``; with ``L2`` this is AdamW's weight decay."""
        s = lr * (self.alpha if alpha is None else alpha)
        if s != 0.0:
            self._decay_all(list(params), s)

    def prox_(self, params: Sequence[Tensor], lr: float, alpha: float | None = None) -> None:
        """In place ``w <- prox_{lr R}(w) = argmin_v R(v) + ||v - w||² / (2 lr)``."""
        s = lr * (self.alpha if alpha is None else alpha)
        if s != 0.0:
            self._prox_all(list(params), s)

    # A subclass implements the per-tensor ``_*_one``; it overrides a ``_*_all`` only for a fused path.
    def _grad_all(self, grads: list[Tensor], params: list[Tensor], alpha: float) -> None:
        for g, w in zip(grads, params, strict=True):
            self._grad_one(g, w, alpha)

    def _decay_all(self, params: list[Tensor], s: float) -> None:
        for w in params:
            self._decay_one(w, s)

    def _prox_all(self, params: list[Tensor], s: float) -> None:
        for w in params:
            self._prox_one(w, s)

    def _grad_one(self, g: Tensor, w: Tensor, alpha: float) -> None:
        raise NotImplementedError

    def _decay_one(self, w: Tensor, s: float) -> None:
        raise NotImplementedError

    def _prox_one(self, w: Tensor, s: float) -> None:
        raise NotImplementedError
