"""Group lasso over coupled channel groups: one norm per channel across every tensor that makes the channel."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightreg.model.dependency_groups import CoupledGroups, Family, coupled_groups
from lightreg.penalties.group_lasso import NEWTON_STEPS
from lightreg.penalties.contract import Penalty, Step

StepOf = Callable[[Tensor], Step | None]


class CoupledGroupLasso(Penalty):
    """``R = alpha * sum_g sqrt(|g|) * ||w_g||_2`` where ``g`` runs over the model's coupled channel groups.

    A group ``g`` is one channel (or attention head) with all its slices: the filter, its bias, its norm
    layer's scale and shift, the next layers' input slices, everything a residual add ties to it
    (``lightreg.model.dependency_groups``, traced by Torch-Pruning's dependency graph). ``|g|`` counts the entries of
    all of them and ``||w_g||`` is the norm over all of them.

    Proximal step, per group, in the metric ``diag(1/t)`` of the step ``t`` the optimizer took (``t`` uniform:
    ``w_g * max(0, 1 - t*alpha*sqrt(|g|) / ||w_g||)``): with ``λ = alpha*sqrt(|g|)`` a group is zero iff
    ``||u_g / t_g|| <= λ``, else ``v_i = u_i * r / (r + λ t_i)`` with ``r`` the root of ``Σ_i u_i²/(r + λt_i)² = 1``
    (Newton, as ``GroupLasso``'s per-coordinate prox). A tensor the step did not move (no gradient) has
    ``t = 0``: its entries stay, and its group dies only with them at zero. Groups share entries (a conv's
    filter ``j`` is in channel ``j``'s group, its input slice ``i`` in channel ``i``'s): the groups' proxes are
    applied one after another, each exact for its group, so a zeroed group is exactly zero and stays so.

    The ``Regularizer`` traces the model at fit start from ``example_inputs`` or the LightningModule's
    ``example_input_array`` and penalises the groups rooted at the selected weights (the default rule: every
    conv/linear weight); the selection then holds every tensor of those groups. All of a group's tensors must
    be in one optimizer. ``reg/<name>/groups_alive`` (and ``/<layer>``) count the live groups.

    Args:
        alpha: strength, a finite float >= 0.
        example_inputs: the input to trace with; default: the module's ``example_input_array``.

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> penalty = CoupledGroupLasso(0.1)
        >>> _ = penalty.bind(net, [("0.weight", net[0].weight)], example_inputs=torch.zeros(1, 3))
        >>> [(f.name, f.units, f.sizes[0].item()) for f in penalty.groups.families]  # 3 + 1 + 2 entries per unit
        [('0', 4, 6.0)]
        >>> penalty.apply_prox_([net[0].weight, net[0].bias, net[2].weight], 100.0)  # a huge step kills all
        >>> int(penalty.groups.families[0].alive().sum())
        0
    """

    name = "coupled_group_lasso"
    joint = True  # the prox needs every tensor of the step at once: the Regularizer hands them over together

    def __init__(self, alpha: float, example_inputs: Any = None) -> None:
        super().__init__(alpha)
        self.example_inputs = example_inputs
        self.groups = CoupledGroups([], [])
        self._bound: tuple[int, tuple[int, ...]] | None = None

    # ---- binding to a model --------------------------------------------------------------------------
    def bind(self, model: nn.Module, selected: Sequence[tuple[str, Tensor]], example_inputs: Any = None) -> list[tuple[str, Tensor]]:
        """Trace ``model`` (once per model and parameter set) and keep the groups rooted at ``selected`` weights.

        Returns the ``(name, tensor)`` pairs of every tensor of the kept groups, in model order.
        """
        key = (id(model), tuple(id(p) for p in model.parameters()))
        if self._bound != key:
            found = coupled_groups(model, example_inputs if example_inputs is not None else self.example_inputs)
            roots = {id(p) for _, p in selected}
            kept = [f for f in found.families if f.root is not None and id(f.root) in roots]
            self.groups, self._bound = CoupledGroups(kept, found.skipped), key
        members = {id(s.param) for f in self.groups.families for s in f.slices}
        names = {id(s.param): s.name for f in self.groups.families for s in f.slices}
        return [(names[id(p)], p) for p in model.parameters() if id(p) in members]

    def metrics(self, name: str) -> dict[str, float]:
        """``reg/<name>/groups_alive`` over all groups, and per group root layer."""
        alive = {f.name: int(f.alive().sum()) for f in self.groups.families}
        out = {f"reg/{name}/groups_alive/{layer}": float(n) for layer, n in alive.items()}
        out[f"reg/{name}/groups_alive"] = float(sum(alive.values()))
        return out

    # ---- the math ----------------------------------------------------------------------------------
    def _families_of(self, w: Tensor) -> list[Family]:
        return [f for f in self.groups.families if any(s.param is w for s in f.slices)]

    def value(self, w: Tensor, alpha: float) -> Tensor:
        """The groups whose first tensor is ``w`` (so that summing over all tensors counts each group once)."""
        total = w.new_zeros((), dtype=torch.float64 if w.dtype == torch.float64 else torch.float32)
        for f in self.groups.families:
            if f.slices[0].param is w:
                total = total + family_value(f, alpha)
        return total

    def gradient(self, w: Tensor, alpha: float) -> Tensor:
        out = torch.zeros_like(w)
        for f in self._families_of(w):
            norms = f.squared_norms().sqrt()
            coef = torch.where(norms > 0, alpha * f.sizes.to(norms).sqrt() / norms, torch.zeros_like(norms))
            for s in f.slices:
                if s.param is w:
                    rows = w.detach().index_select(s.dim, s.index)
                    shape = [-1 if d == s.dim else 1 for d in range(w.ndim)]
                    out.index_add_(s.dim, s.index, rows * coef[s.unit].to(w.dtype).view(shape))
        return out

    def apply_decay_(self, params: Sequence[Tensor], lr: float, alpha: float | None = None) -> None:
        """``w -= lr * ∇R(w)``, every gradient taken before any tensor moves."""
        alpha = self.alpha if alpha is None else alpha
        if lr * alpha != 0.0:
            for w, g in [(w, self.gradient(w, alpha)) for w in params]:
                w.sub_(g, alpha=lr)

    def prox_(self, w: Tensor, step: Step, alpha: float) -> None:
        self.apply_prox_([w], [step], alpha)

    def apply_prox_(self, params: Sequence[Tensor], steps: Step | Sequence[Step], alpha: float | None = None) -> None:
        """The prox of every group with a tensor in ``params`` (``steps``: one for all, or one per tensor);
        tensors of those groups missing from ``params`` count as not stepped (``t = 0``)."""
        alpha = self.alpha if alpha is None else alpha
        if alpha == 0.0:
            return
        position = {id(p): i for i, p in enumerate(params)}
        if not isinstance(steps, (int, float)) and len(steps) != len(params):
            raise ValueError(f"steps has {len(steps)} entries for {len(params)} tensors")
        for family in self.groups.families:
            if any(id(s.param) in position for s in family.slices):
                _check_one_optimizer(family, position)
                cache: dict[int, Step | None] = {}

                def step_of(p: Tensor) -> Step | None:
                    if id(p) not in cache:
                        i = position.get(id(p))
                        cache[id(p)] = None if i is None else (float(steps) if isinstance(steps, (int, float)) else steps[i])
                    return cache[id(p)]

                family_prox_(family, step_of, alpha)


def _check_one_optimizer(family: Family, position: dict[int, int]) -> None:
    for s in family.slices:
        if id(s.param) not in position and s.param.grad is not None:
            raise ValueError(f"coupled group {family.name!r}: {s.name!r} has a gradient but is not stepped with the "
                             "group's other tensors (another optimizer?); put all of a group's tensors in one optimizer")


def family_value(family: Family, alpha: float) -> Tensor:
    """``alpha * sum_g sqrt(|g|) ||w_g||``, differentiable (the oracle of the tests and of ``value``)."""
    p0 = family.slices[0].param
    dtype = torch.float64 if p0.dtype == torch.float64 else torch.float32
    sq = torch.zeros(family.units, dtype=dtype, device=p0.device)
    for s in family.slices:
        rows = s.param.index_select(s.dim, s.index).movedim(s.dim, 0).reshape(len(s.index), -1)
        sq = sq.index_add(0, s.unit, rows.to(dtype).square().sum(1))
    return alpha * (family.sizes.to(sq).sqrt() * sq.sqrt()).sum()


def family_prox_(family: Family, step_of: StepOf, alpha: float) -> None:
    """In place, the prox of every unit of ``family`` in the metric ``diag(1/t)`` (see ``CoupledGroupLasso``)."""
    p0 = family.slices[0].param
    dtype = torch.float64 if p0.dtype == torch.float64 else torch.float32  # q³ overflows in 16 bits
    device, units = p0.device, family.units
    us, ts = [], []
    for s in family.slices:
        u = s.param.detach().index_select(s.dim, s.index).movedim(s.dim, 0).to(dtype)
        step = step_of(s.param)
        if step is None:
            t = torch.zeros((), dtype=dtype, device=device).expand_as(u)
        elif isinstance(step, Tensor):
            t = step.expand_as(s.param).index_select(s.dim, s.index).movedim(s.dim, 0).to(dtype)
        else:
            t = torch.full((), float(step), dtype=dtype, device=device).expand_as(u)
        us.append(u)
        ts.append(t)
    lam = alpha * family.sizes.to(device=device, dtype=dtype).sqrt()

    def unit_sum(values: list[Tensor]) -> Tensor:
        out = torch.zeros(units, dtype=dtype, device=device)
        for s, v in zip(family.slices, values, strict=True):
            out.index_add_(0, s.unit, v.reshape(len(s.index), -1).sum(1))
        return out

    def per_row(v: Tensor, s: Any, like: Tensor) -> Tensor:
        return v[s.unit].view(-1, *[1] * (like.ndim - 1))

    # u / t, where t = 0: 0 for u = 0 (nothing to move), inf otherwise (a frozen nonzero entry keeps its group alive)
    ratio = [torch.where(t > 0, u / t, torch.where(u == 0, 0.0, math.inf)) for u, t in zip(us, ts, strict=True)]
    nonzero = unit_sum([x * x for x in ratio]) > lam * lam
    t_max = torch.zeros(units, dtype=dtype, device=device)
    for s, t in zip(family.slices, ts, strict=True):
        t_max.scatter_reduce_(0, s.unit, t.reshape(len(s.index), -1).amax(1), reduce="amax")
    frozen = unit_sum([torch.where(t > 0, 0.0, u * u) for u, t in zip(us, ts, strict=True)])
    r = torch.maximum(unit_sum([u * u for u in us]).sqrt() - lam * t_max, frozen.sqrt()).clamp_(min=0.0)
    for _ in range(NEWTON_STEPS):
        qs = [(u / (per_row(r, s, u) + per_row(lam, s, u) * t)).nan_to_num_(0.0)
              for s, u, t in zip(family.slices, us, ts, strict=True)]
        sq = unit_sum([q * q for q in qs])
        s3 = unit_sum([(q.pow(3) / u).nan_to_num_(0.0, posinf=0.0, neginf=0.0) for q, u in zip(qs, us, strict=True)])
        r = torch.where(s3 > 0, r + (sq.pow(1.5) - sq) / s3, r)
    r = torch.where(nonzero, r, torch.zeros_like(r))
    for s, u, t in zip(family.slices, us, ts, strict=True):
        rr, ll = per_row(r, s, u), per_row(lam, s, u)
        v = torch.where(rr > 0, u * rr / (rr + ll * t), torch.zeros_like(u))
        s.param.detach().index_copy_(s.dim, s.index, v.movedim(0, s.dim).to(s.param.dtype))


def joint_prox_(penalty: Penalty, work: Sequence[tuple[Any, Sequence[Tensor], Step | Sequence[Step], float]], alpha: float) -> bool:
    """One prox over every tensor of an optimizer step (all param groups at once) for a joint penalty;
    ``False`` (nothing done) for any other, which takes its param groups one by one."""
    if not getattr(penalty, "joint", False):
        return False
    params = [p for _, ps, _, _ in work for p in ps]
    steps = _JointSteps([(ps, st) for _, ps, st, _ in work])
    penalty.apply_prox_(params, steps, alpha)
    return True


class _JointSteps(Sequence):
    """The per-tensor steps of several param groups as one sequence; a lazy step is computed when read."""

    def __init__(self, parts: list[tuple[Sequence[Tensor], Step | Sequence[Step]]]) -> None:
        self.where = [(part, i) for part, (ps, _) in enumerate(parts) for i in range(len(ps))]
        self.parts = parts

    def __len__(self) -> int:
        return len(self.where)

    def __getitem__(self, k: int) -> Step:  # type: ignore[override]
        part, i = self.where[k]
        steps = self.parts[part][1]
        return float(steps) if isinstance(steps, (int, float)) else steps[i]
