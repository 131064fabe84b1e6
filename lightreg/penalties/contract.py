"""The ``Penalty`` contract: ``R(w)``, its gradient and its proximal operator, one tensor at a time.

A penalty is three pure functions named after the math, which is all a user-defined penalty has to
write (see ``docs/extending.md``):

* ``value(w, alpha)``: ``R(w)``, differentiable, so ``loss + penalty(params)`` works;
* ``gradient(w, alpha)``: ``∇R(w)`` (a subgradient where ``R`` has a kink);
* ``prox(w, step, alpha)``: ``argmin_v R(v) + Σ_i (v_i - w_i)² / (2 step_i)``, where ``step`` is a float
  or a tensor broadcastable to ``w`` (a per-coordinate step, as an adaptive optimizer takes).

The ``Regularizer`` calls the in-place forms ``add_gradient_``, ``decay_`` and ``prox_``; their defaults
are built from the three functions above, and the built-in penalties override them with fused,
temporary-free kernels. The ``apply_*`` methods run one of them over lists of tensors.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from lightreg.base.checks import check_real, check_tensor_kind

#: A prox step: one float for every coordinate, or a tensor broadcastable to the weight.
Step = float | Tensor


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

    A subclass implements ``value``, ``gradient`` and ``prox`` for one tensor (all three pure), and may
    override the in-place ``add_gradient_``, ``decay_`` and ``prox_`` for speed. ``name`` is the default
    metric name (``reg/<name>/penalty``).

    Args:
        alpha: strength, a finite float >= 0.

    Example:
        >>> class Cauchy(Penalty):  # R(w) = alpha * sum log(1 + w²): a smooth, non-convex penalty
        ...     name = "cauchy"
        ...     def value(self, w, alpha):
        ...         return alpha * torch.log1p(w * w).sum()
        ...     def gradient(self, w, alpha):
        ...         return alpha * 2 * w / (1 + w * w)
        >>> Cauchy(0.5)(torch.tensor([0.0, 1.0]))
        tensor(0.3466)
        >>> w = torch.tensor([1.0]); Cauchy(0.5).decay_(w, step=0.1, alpha=0.5); w
        tensor([0.9500])
    """

    name = "penalty"
    #: ``R`` is separable, a sum of one term per entry (``R(w) = Σ_i r(w_i)``): every operation on a part of
    #: ``w`` is the operation on ``w`` restricted to that part, and the values of the parts add up. The
    #: ``Regularizer`` then hands the penalty each rank's own shard of a sharded (FSDP2) parameter as a plain
    #: tensor and adds values and zero counts up across the ranks itself (``lightreg.base.distributed``). A
    #: penalty that is not separable gets the sharded parameter whole, a ``DTensor``, whose sums are global.
    separable = False
    #: The proximal step of ``R`` sets whole entries to exactly zero (``L1``-like penalties): target sparsity applies.
    makes_zeros = False
    #: ``R`` has no usable gradient (``L0``): only mode ``"proximal"`` can apply it.
    proximal_only = False
    #: ``prox`` takes a per-coordinate step (a tensor); if not, an adaptive optimizer's prox takes its plain ``lr``.
    coordinate_steps = True
    #: ``zero_levels`` cover every tensor the penalty acts on, so target sparsity can set alpha from them; not so
    #: where a group takes in a tensor without levels of its own (``GroupLasso(with_bias=True)``'s bias).
    levels_cover_all = True

    def __init__(self, alpha: float) -> None:
        self.alpha = check_real("alpha", alpha)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._hparams().items())
        return f"{type(self).__name__}({args})"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self._hparams() == other._hparams()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self), tuple(self._hparams().items())))

    def _hparams(self) -> dict[str, float | int | bool]:
        return {"alpha": self.alpha}

    @property
    def l2_part(self) -> bool:
        """Whether the penalty contains a squared-norm (weight-decay-like) term."""
        return False

    def __call__(self, tensors: Tensor | Iterable[Tensor], alpha: float | None = None) -> Tensor:
        """Differentiable ``Σ_w R(w)``, so ``loss + penalty(model.parameters())`` works.

        Sums are accumulated in float32 at least: a float16 model's penalty is finite and exact enough.
        """
        alpha = self.alpha if alpha is None else alpha
        tensors = _as_tensor_list(tensors)
        if not tensors:
            raise ValueError("tensors is empty: there is nothing to penalise")
        return torch.stack([self.value(w, alpha) for w in tensors]).sum()

    # ---- the contract: three pure functions of one tensor ----------------------------------------
    def value(self, w: Tensor, alpha: float) -> Tensor:
        """``R(w)`` of one tensor at strength ``alpha``: a 0-d tensor, differentiable."""
        raise NotImplementedError(f"{type(self).__name__} must implement value(w, alpha)")

    def gradient(self, w: Tensor, alpha: float) -> Tensor:
        """``∇R(w)`` (a subgradient at kinks), a new tensor shaped like ``w``."""
        raise NotImplementedError(f"{type(self).__name__} must implement gradient(w, alpha) for modes 'gradient' and 'decoupled'")

    def prox(self, w: Tensor, step: Step, alpha: float) -> Tensor:
        """``argmin_v R(v) + Σ_i (v_i - w_i)² / (2 step_i)``, a new tensor; ``step`` a float or a tensor."""
        raise NotImplementedError(f"{type(self).__name__} must implement prox(w, step, alpha) for mode 'proximal'")

    def zero_levels(self, w: Tensor, step: Step) -> Tensor:
        """For each unit the prox can zero (an entry; a group for ``GroupLasso``): the least alpha that zeroes it.

        ``prox_{step R}(w)`` at strength ``alpha`` zeroes exactly the units whose level is ``<= alpha``; target
        sparsity sets alpha to a k-th smallest level. A new flat tensor of values ``>= +0.0``; for a
        ``DTensor`` ``w`` (a penalty that is not ``separable``), this rank's share, such that the shares of
        the ranks that hold different shards of ``w`` hold every unit once.
        """
        raise NotImplementedError(f"{type(self).__name__} makes no exact zeros, so it has no zero levels")

    # ---- optional hooks: the tensors the penalty acts on, and its own metrics -------------------------
    def bind(self, model: torch.nn.Module, selected: Sequence[tuple[str, Tensor]]) -> list[tuple[str, Tensor]]:
        """The ``(name, tensor)`` pairs the penalty acts on, given the ``selected`` ones of ``model``.

        The ``Regularizer`` calls it when it binds to the model (fit start, a changed parameter set). The base
        keeps ``selected``; a penalty whose groups span several tensors adds them here and records the pairing
        (``GroupLasso(with_bias=True)``: each weight's bias; ``CoupledGroupLasso``: every tensor of its groups).

        Example:
            >>> from lightreg import L1
            >>> lin = torch.nn.Linear(2, 1)
            >>> [name for name, _ in L1(0.1).bind(lin, [("weight", lin.weight)])]
            ['weight']
        """
        return list(selected)

    def metrics(self, name: str) -> dict[str, float]:
        """The penalty's own metrics, named under ``reg/<name>/`` (the base has none)."""
        return {}

    def check_tensor(self, name: str, w: Tensor) -> None:
        """Raise ``TypeError``/``ValueError`` if the penalty cannot apply to ``w``; called before any weight changes.

        The base accepts dense real floating-point tensors; an override adds its own conditions after it.
        """
        check_tensor_kind(name, w, type(self).__name__)

    # ---- in place, one tensor: what the callback calls (built-ins override these) ------------------
    def add_gradient_(self, g: Tensor, w: Tensor, alpha: float) -> None:
        """``g += ∇R(w)``: the gradient of ``R`` added to the loss's."""
        g.add_(self.gradient(w, alpha))

    def decay_(self, w: Tensor, step: float, alpha: float) -> None:
        """``w -= step * ∇R(w)``: the decoupled step (with ``L2``, AdamW's weight decay)."""
        w.sub_(self.gradient(w, alpha), alpha=step)

    def prox_(self, w: Tensor, step: Step, alpha: float) -> None:
        """``w <- prox_{step R}(w)``."""
        w.copy_(self.prox(w, step, alpha))

    # ---- over lists of tensors -----------------------------------------------------------------------
    def apply_gradient_(self, grads: Sequence[Tensor], params: Sequence[Tensor], alpha: float | None = None) -> None:
        """``g += ∇R(w)`` for each pair."""
        alpha = self.alpha if alpha is None else alpha
        if alpha != 0.0:
            for g, w in zip(grads, params, strict=True):
                self.add_gradient_(g, w, alpha)

    def apply_decay_(self, params: Sequence[Tensor], lr: float, alpha: float | None = None) -> None:
        """``w -= lr * ∇R(w)`` for each tensor, with one learning rate."""
        alpha = self.alpha if alpha is None else alpha
        if lr * alpha != 0.0:
            for w in params:
                self.decay_(w, lr, alpha)

    def apply_prox_(self, params: Sequence[Tensor], steps: Step | Sequence[Step], alpha: float | None = None) -> None:
        """``w <- prox_{t R}(w)`` for each tensor; ``steps`` is one float for all, or one step per tensor."""
        alpha = self.alpha if alpha is None else alpha
        if alpha == 0.0:
            return
        if isinstance(steps, (int, float)):
            if steps != 0.0:
                for w in params:
                    self.prox_(w, float(steps), alpha)
            return
        if len(steps) != len(params):
            raise ValueError(f"steps has {len(steps)} entries for {len(params)} tensors")
        for i, w in enumerate(params):
            # Indexed, not zipped: a step computed on demand (LazySteps) is freed before the next one is made.
            self.prox_(w, steps[i], alpha)
