"""Group lasso over coupled channel groups: one norm per channel across every tensor that makes the channel."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightreg.model.dependency_groups import CoupledGroups, Family, coupled_groups
from lightreg.penalties.contract import Penalty, Step
from lightreg.penalties.coupled_prox import FamilyView, StepOf, family_value


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
    filter ``j`` is in channel ``j``'s group, its input slice ``i`` in channel ``i``'s): every group's exact prox
    factors are computed from the same weights, then each entry takes the product of its groups' factors, so a
    zeroed group is exactly zero, and group ``g`` is zeroed exactly when its *zero level*
    ``||u_g / t_g|| / sqrt(|g|)`` is at most ``alpha`` (``joint_zero_levels``; the order of the groups does not matter).

    With ``target_sparsity`` the ``Regularizer`` counts in groups: the fraction of the penalised coupled groups
    (channels and heads; ``groups.skipped`` ones are not penalised, so not counted) that are exactly zero.

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
    makes_zeros = True
    #: What a target counts (its messages say so): groups, the units the prox zeroes, not parameters.
    target_unit = "coupled groups"
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
            if not kept:  # nothing to penalise: a target would do nothing, silently
                why = "; ".join(f"{root}: {reason}" for root, reason in found.skipped[:3])
                raise ValueError(f"{type(self).__name__} finds no coupled group among the {len(selected)} selected "
                                 f"weights of {type(model).__name__}" + (f" (skipped: {why})" if why else "")
                                 + "; a channel that reaches the output, a LayerNorm or an embedding is not one")
            self.groups, self._bound = CoupledGroups(kept, found.skipped), key
        members = {id(s.param) for f in self.groups.families for s in f.slices}
        names = {id(s.param): s.name for f in self.groups.families for s in f.slices}
        return [(names[id(p)], p) for p in model.parameters() if id(p) in members]

    def metrics(self, name: str) -> dict[str, float]:
        """``reg/<name>/groups_alive`` over all groups and per group root layer, and ``reg/<name>/groups`` (all)."""
        alive = {f.name: int(f.alive().sum()) for f in self.groups.families}
        out = {f"reg/{name}/groups_alive/{layer}": float(n) for layer, n in alive.items()}
        out[f"reg/{name}/groups_alive"] = float(sum(alive.values()))
        out[f"reg/{name}/groups"] = float(sum(f.units for f in self.groups.families))
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
        tensors of those groups missing from ``params`` count as not stepped (``t = 0``).

        Overlapping groups are proxed side by side: every group's factors come from the weights as the step left
        them, then each entry is multiplied by the factors of all its groups (in any order: they commute).
        """
        alpha = self.alpha if alpha is None else alpha
        if alpha == 0.0:
            return
        families, step_of = self._stepped(params, steps)
        radii = []
        for family in families:  # every radius before any weight moves
            view = FamilyView(family, step_of(family))
            radii.append(view.radii(alpha, view.zero_levels()))
        for family, r in zip(families, radii, strict=True):
            FamilyView(family, step_of(family)).scale_(alpha, r)

    def joint_zero_levels(self, params: Sequence[Tensor], steps: Step | Sequence[Step]) -> Tensor:
        """The zero level of every group with a tensor in ``params``, one value per group (in family order).

        The level of group ``g`` is ``||u_g / t_g|| / sqrt(|g|)`` (``u`` the weights as the step left them, ``t``
        the step, 0 for a tensor of ``g`` missing from ``params``): ``apply_prox_`` at ``alpha`` zeroes exactly the
        groups whose level is at most ``alpha`` (``lightreg.penalties.coupled_prox``). Target sparsity sets alpha to
        a k-th smallest of these.

        Example:
            >>> net = nn.Sequential(nn.Linear(1, 2), nn.ReLU(), nn.Linear(2, 1))
            >>> penalty = CoupledGroupLasso(0.0)
            >>> params = [p for _, p in penalty.bind(net, [("0.weight", net[0].weight)], example_inputs=torch.zeros(1, 1))]
            >>> levels = penalty.joint_zero_levels(params, 0.5)
            >>> penalty.apply_prox_(params, 0.5, float(levels.min())); int(penalty.groups.families[0].alive().sum())
            1
        """
        families, step_of = self._stepped(params, steps)
        if not families:
            return torch.zeros(0)
        return torch.cat([self._levels(FamilyView(f, step_of(f))) for f in families])

    def _levels(self, view: FamilyView) -> Tensor:
        return view.zero_levels()

    def groups_to_zero(self, levels: Tensor, fraction: float, n: int) -> int:
        """How many of the ``n`` groups (zero ``levels`` from ``joint_zero_levels``) a target's ramped ``fraction``
        zeroes: ``round(fraction * n)`` (halves rounded up), the groups of lowest level. Override to count another way (a parameter
        budget: ``scripts/compare_structured.py``); the groups still die in increasing order of level.

        Example:
            >>> CoupledGroupLasso(0.0).groups_to_zero(torch.tensor([0.3, 0.1, 0.2]), 0.5, 3)
            2
        """
        return int(math.floor(fraction * n + 0.5))

    def zero_fraction(self) -> Tensor:
        """The fraction of the groups that are exactly zero (what a target counts)."""
        dead = [(~f.alive()).sum() for f in self.groups.families]
        units = sum(f.units for f in self.groups.families)
        return torch.stack(dead).sum().float() / max(units, 1) if dead else torch.tensor(0.0)

    def _stepped(self, params: Sequence[Tensor], steps: Step | Sequence[Step]) -> tuple[list[Family], Callable[[Family], StepOf]]:
        """The families with a tensor in ``params``, and for each a cached ``tensor -> step`` (``None``: not stepped)."""
        position = {id(p): i for i, p in enumerate(params)}
        if not isinstance(steps, (int, float)) and len(steps) != len(params):
            raise ValueError(f"steps has {len(steps)} entries for {len(params)} tensors")
        families = [f for f in self.groups.families if any(id(s.param) in position for s in f.slices)]
        for family in families:
            _check_one_optimizer(family, position)

        def step_of(family: Family) -> StepOf:
            cache: dict[int, Step | None] = {}

            def step(p: Tensor) -> Step | None:
                if id(p) not in cache:
                    i = position.get(id(p))
                    cache[id(p)] = None if i is None else (float(steps) if isinstance(steps, (int, float)) else steps[i])
                return cache[id(p)]
            return step
        return families, step_of


def _check_one_optimizer(family: Family, position: dict[int, int]) -> None:
    for s in family.slices:
        if id(s.param) not in position and s.param.grad is not None:
            raise ValueError(f"coupled group {family.name!r}: {s.name!r} has a gradient but is not stepped with the "
                             "group's other tensors (another optimizer?); put all of a group's tensors in one optimizer")


def joint_prox_(penalty: Penalty, work: Sequence[tuple[Any, Sequence[Tensor], Step | Sequence[Step], float]], alpha: float) -> bool:
    """One prox over every tensor of an optimizer step (all param groups at once) for a joint penalty;
    ``False`` (nothing done) for any other, which takes its param groups one by one."""
    if not getattr(penalty, "joint", False):
        return False
    params = [p for _, ps, _, _ in work for p in ps]
    steps = JointSteps([(ps, st) for _, ps, st, _ in work])
    penalty.apply_prox_(params, steps, alpha)
    return True


class JointSteps(Sequence):
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
