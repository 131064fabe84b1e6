"""The math of one family of coupled groups: its value, each group's zero level, and its prox in the metric ``diag(1/t)``.

A family (``lightreg.model.dependency_groups.Family``) is a set of units (channels, heads), each made of rows of
several tensors. Every function here reads a family's slices into per-slice matrices ``u`` (row ``k`` belongs to
unit ``slice.unit[k]``) with the matching steps ``t``, and sums over a unit's rows with ``index_add_``. A tensor the
step did not move (``step_of`` gives ``None``) has ``t = 0``.

The prox of ``λ ||v||`` (``λ = alpha * sqrt(|g|)``) in the metric ``diag(1/t)``, ``argmin_v λ||v|| + Σ_i (v_i -
u_i)² / (2 t_i)``, is ``v_i = u_i * r / (r + λ t_i)`` with ``r = ||v|| > 0`` the root of ``Σ_i u_i² / (r + λ t_i)² =
1``, or ``v = 0``: zero iff ``0`` is in the subdifferential at ``0``, ``||u / t|| <= λ``. So the group's *zero level*
(the least alpha that zeroes it) is ``||u_g / t_g|| / sqrt(|g|)``; with one step ``t`` for all, ``||u_g|| / (t
sqrt(|g|))``; ``u_i / t_i`` is ``0`` for ``u_i = t_i = 0`` and ``inf`` for ``u_i != 0 = t_i`` (a frozen nonzero entry
keeps its group alive). The prox decides zero or not by comparing the very same level against alpha, so a target
that sets alpha to a level gets exactly the groups at or below it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from lightreg.model.dependency_groups import Family
from lightreg.penalties.contract import Step
from lightreg.penalties.group_lasso import NEWTON_STEPS

StepOf = Callable[[Tensor], Step | None]


def _dtype(family: Family) -> torch.dtype:
    return torch.float64 if family.slices[0].param.dtype == torch.float64 else torch.float32  # q³ overflows in 16 bits


class FamilyView:
    """The rows ``u`` of every slice of ``family`` and their steps ``t`` (one matrix per slice, in ``dtype``)."""

    def __init__(self, family: Family, step_of: StepOf) -> None:
        self.family, self.dtype = family, _dtype(family)
        self.device = family.slices[0].param.device
        self.us: list[Tensor] = []
        self.ts: list[Tensor] = []
        for s in family.slices:
            u = s.param.detach().index_select(s.dim, s.index).movedim(s.dim, 0).to(self.dtype)
            step = step_of(s.param)
            if step is None:
                t = torch.zeros((), dtype=self.dtype, device=self.device).expand_as(u)
            elif isinstance(step, Tensor):
                t = step.expand_as(s.param).index_select(s.dim, s.index).movedim(s.dim, 0).to(self.dtype)
            else:
                t = torch.full((), float(step), dtype=self.dtype, device=self.device).expand_as(u)
            self.us.append(u)
            self.ts.append(t)

    def unit_sum(self, values: list[Tensor]) -> Tensor:
        out = torch.zeros(self.family.units, dtype=self.dtype, device=self.device)
        for s, v in zip(self.family.slices, values, strict=True):
            out.index_add_(0, s.unit, v.reshape(len(s.index), -1).sum(1))
        return out

    def zero_levels(self) -> Tensor:
        """``||u_g / t_g|| / sqrt(|g|)`` per unit (see the module docstring)."""
        ratio = [torch.where(t > 0, u / t, torch.where(u == 0, 0.0, math.inf)) for u, t in zip(self.us, self.ts, strict=True)]
        return self.unit_sum([x * x for x in ratio]).sqrt_().div_(self.family.sizes.to(self.device, self.dtype).sqrt())

    def l0_levels(self) -> Tensor:
        """``Σ_i u_i² / (2 t_i |g|)`` per unit: the least alpha at which ``CoupledGroupL0``'s prox zeroes it."""
        cost = [torch.where(t > 0, u * u / t, torch.where(u == 0, 0.0, math.inf)) for u, t in zip(self.us, self.ts, strict=True)]
        return self.unit_sum(cost).div_(2.0 * self.family.sizes.to(self.device, self.dtype))

    def radii(self, alpha: float, levels: Tensor) -> Tensor:
        """``r = ||v_g||`` of each unit's prox at ``alpha`` (0 for a unit whose level is at most ``alpha``)."""
        units, lam = self.family.units, self._lam(alpha)
        t_max = torch.zeros(units, dtype=self.dtype, device=self.device)
        for s, t in zip(self.family.slices, self.ts, strict=True):
            t_max.scatter_reduce_(0, s.unit, t.reshape(len(s.index), -1).amax(1), reduce="amax")
        frozen = self.unit_sum([torch.where(t > 0, 0.0, u * u) for u, t in zip(self.us, self.ts, strict=True)])
        r = torch.maximum(self.unit_sum([u * u for u in self.us]).sqrt() - lam * t_max, frozen.sqrt()).clamp_(min=0.0)
        for _ in range(NEWTON_STEPS):  # Newton on 1/sqrt(Σ q²) = 1, q_i = u_i / (r + λ t_i), as GroupLasso's prox
            qs = [(u / (self._rows(r, s, u) + self._rows(lam, s, u) * t)).nan_to_num_(0.0)
                  for s, u, t in zip(self.family.slices, self.us, self.ts, strict=True)]
            sq = self.unit_sum([q * q for q in qs])
            s3 = self.unit_sum([(q.pow(3) / u).nan_to_num_(0.0, posinf=0.0, neginf=0.0) for q, u in zip(qs, self.us, strict=True)])
            r = torch.where(s3 > 0, r + (sq.pow(1.5) - sq) / s3, r)
        return torch.where(levels > alpha, r, torch.zeros_like(r))

    def scale_(self, alpha: float, r: Tensor) -> None:
        """Multiply each entry in place by its unit's factor ``r / (r + λ t_i)`` (0 where ``r = 0``)."""
        lam = self._lam(alpha)
        for s, t in zip(self.family.slices, self.ts, strict=True):
            rows = s.param.detach().index_select(s.dim, s.index).movedim(s.dim, 0)
            rr, ll = self._rows(r, s, rows), self._rows(lam, s, rows)
            factor = torch.where(rr > 0, rr / (rr + ll * t), torch.zeros_like(rr))
            s.param.detach().index_copy_(s.dim, s.index, (rows.to(self.dtype) * factor).movedim(0, s.dim).to(s.param.dtype))

    def _lam(self, alpha: float) -> Tensor:
        return alpha * self.family.sizes.to(device=self.device, dtype=self.dtype).sqrt()

    @staticmethod
    def _rows(v: Tensor, s: Any, like: Tensor) -> Tensor:
        return v[s.unit].view(-1, *[1] * (like.ndim - 1))


def zero_units_(family: Family, dead: Tensor) -> None:
    """Set every entry of the ``dead`` units of ``family`` (a boolean per unit) to exactly 0, in place."""
    for s in family.slices:
        s.param.detach().index_fill_(s.dim, s.index[dead[s.unit]], 0.0)


def family_value(family: Family, alpha: float) -> Tensor:
    """``alpha * sum_g sqrt(|g|) ||w_g||``, differentiable (the oracle of the tests and of ``value``)."""
    p0 = family.slices[0].param
    sq = torch.zeros(family.units, dtype=_dtype(family), device=p0.device)
    for s in family.slices:
        rows = s.param.index_select(s.dim, s.index).movedim(s.dim, 0).reshape(len(s.index), -1)
        sq = sq.index_add(0, s.unit, rows.to(sq.dtype).square().sum(1))
    return alpha * (family.sizes.to(sq).sqrt() * sq.sqrt()).sum()


def family_prox_(family: Family, step_of: StepOf, alpha: float) -> None:
    """In place, the prox of every unit of ``family`` alone (its groups do not overlap one another).

    Example:
        >>> from torch import nn
        >>> from lightreg.model.dependency_groups import coupled_groups
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1))
        >>> with torch.no_grad():
        ...     _ = net[0].weight.copy_(torch.tensor([[3.0, 0.0], [0.1, 0.0]])), net[0].bias.zero_(), net[2].weight.zero_()
        >>> family = coupled_groups(net, torch.zeros(1, 2)).families[0]
        >>> FamilyView(family, lambda p: 1.0).zero_levels()  # ||w_g|| / (t sqrt(|g|)), |g| = 2 + 1 + 1
        tensor([1.5000, 0.0500])
        >>> family_prox_(family, lambda p: 1.0, 0.5); net[0].weight  # unit 0 scaled by 1 - 0.5 * 2 / 3, unit 1 zero
        Parameter containing:
        tensor([[2., 0.],
                [0., 0.]], requires_grad=True)
    """
    view = FamilyView(family, step_of)
    view.scale_(alpha, view.radii(alpha, view.zero_levels()))
