"""A cost per entry of every live coupled group: the prox keeps or removes whole channels, and never shrinks them."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lightreg.penalties.contract import Step
from lightreg.penalties.coupled_group_lasso import CoupledGroupLasso
from lightreg.penalties.coupled_prox import FamilyView, zero_units_


class CoupledGroupL0(CoupledGroupLasso):
    """``R = alpha * sum_g |g| * [w_g != 0]`` over the model's coupled channel groups (``CoupledGroupLasso``'s groups).

    ``|g|`` is the number of entries of the group over all its tensors, so ``R`` is alpha times the entries of the
    live groups. The prox in the metric ``diag(1/t)`` of the optimizer's step, ``argmin_v R(v) + Σ_i (v_i - u_i)² /
    (2 t_i)``, keeps a group as it is (cost ``alpha |g|``) or sets it to zero (cost ``Σ_i u_i² / (2 t_i)``),
    whichever is less: a hard threshold on groups, the survivors are not shrunk. So the group's zero level is
    ``Σ_i u_i² / (2 t_i |g|)`` (``L0``'s ``w² / (2t)`` averaged over the group; ``u_i² / 0`` is ``inf`` for a nonzero
    entry of a tensor the step did not move, ``0`` for a zero one), and the group is zeroed iff its level is at most
    ``alpha``. Overlapping groups decide from the same weights, then the entries of every zeroed group are set to 0.
    Proximal mode only (``R`` has no useful gradient). With ``target_sparsity`` it is gradual magnitude pruning of
    coupled groups with exact zeros, in the optimizer's metric.

    Args:
        alpha: strength, a finite float >= 0.
        example_inputs: the input to trace with; default: the module's ``example_input_array``.

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(1, 2), nn.ReLU(), nn.Linear(2, 1))
        >>> with torch.no_grad():
        ...     _ = net[0].weight.copy_(torch.tensor([[2.0], [0.1]])), net[0].bias.zero_(), net[2].weight.fill_(1.0)
        >>> penalty = CoupledGroupL0(0.3)
        >>> params = [p for _, p in penalty.bind(net, [("0.weight", net[0].weight)], example_inputs=torch.zeros(1, 1))]
        >>> penalty.joint_zero_levels(params, 1.0)  # (w² + b² + v²) / (2 * 3)
        tensor([0.8333, 0.1683])
        >>> penalty.apply_prox_(params, 1.0); net[0].weight  # unit 1 (level 0.17 <= 0.3) is removed, unit 0 kept as it was
        Parameter containing:
        tensor([[2.],
                [0.]], requires_grad=True)
    """

    name = "coupled_group_l0"
    proximal_only = True

    def value(self, w: Tensor, alpha: float) -> Tensor:
        """``alpha * Σ |g|`` over the live groups whose first tensor is ``w`` (each group counted once over all tensors)."""
        total = torch.zeros((), dtype=torch.float64)
        for f in self.groups.families:
            if f.slices[0].param is w:
                total = total + (f.sizes * f.alive().cpu()).sum()
        return (alpha * total).to(w.device, torch.float64 if w.dtype == torch.float64 else torch.float32)

    def gradient(self, w: Tensor, alpha: float) -> Tensor:
        raise NotImplementedError("CoupledGroupL0 has no useful gradient: use mode='proximal'")

    def apply_prox_(self, params: Sequence[Tensor], steps: Step | Sequence[Step], alpha: float | None = None) -> None:
        """Zero every group with a tensor in ``params`` whose zero level is at most ``alpha``; leave the others."""
        alpha = self.alpha if alpha is None else alpha
        if alpha == 0.0:
            return
        families, step_of = self._stepped(params, steps)
        dead = [self._levels(FamilyView(f, step_of(f))) <= alpha for f in families]  # every decision before any weight moves
        for family, d in zip(families, dead, strict=True):
            zero_units_(family, d)

    def _levels(self, view: FamilyView) -> Tensor:
        return view.l0_levels()
