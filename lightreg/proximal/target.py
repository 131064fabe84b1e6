"""Target sparsity: the penalty level that zeroes a requested, gradually ramped fraction of the weights.

Level tracking, not a controller. A penalty whose prox makes zeros zeroes a unit (an entry, or a group for
``GroupLasso``) exactly when its *zero level* is at most alpha: ``|w_i| / t_i`` for ``L1`` (``/ l1_ratio``
for ``ElasticNet``), ``w_i² / (2 t_i)`` for ``L0``, ``||w_g / t_g|| / sqrt(|g|)`` for ``GroupLasso``,
``t`` the prox step (``Penalty.zero_levels``); ``||u_g / t_g|| / sqrt(|g|)`` for each coupled group of
``CoupledGroupLasso`` (``Σ u_i² / (2 t_i |g|)`` for ``CoupledGroupL0``), whose groups span tensors and param groups,
so their levels and prox take the whole step at once (``joint_zero_levels``) and the target counts groups. So on
the selection steps of the ramp, right after the optimizer step, alpha is set to the k-th smallest zero level over
the whole selection, ``k = round(s_t * n)``, and the prox zeroes exactly the ramped target ``s_t`` (more only on ties). Selecting reads every tensor twice, so it is done
every ``target_every`` steps from the ramp's start (default ``lightreg.proximal.ramp.default_interval``) and always
at the step before the freeze, so the fit ends exactly on the target; in between, the zero pattern of the last
selection is held (a mask put back after each step, as gradual magnitude pruning holds its mask between pruning
steps) and the penalty is off. A step whose lr is 0 moves no weight: it zeroes and selects nothing. The target follows the cubic schedule of Zhu & Gupta (2017) over a window of steps
(``lightreg.proximal.ramp``). After the ramp (from ``freeze`` on) the zero pattern is frozen (a mask re-applied
after every step) and the penalty is off, so the surviving weights lose the penalty's shrinkage bias (the debias
phase). Steps are counted by the callback's own optimizer step hooks as well as ``trainer.global_step``, which raw
optimizers under manual optimization do not advance.

:class:`TargetSparsity` holds that state and does this work for the ``Regularizer``, whose hooks call it in
one line each: the level before the prox, the masks in the frozen phase, the checkpoint state, the metrics.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from lightreg.base.checks import check_int, check_real
from lightreg.base.distributed import ShardReduction
from lightreg.proximal.kth_value import Levels, level_for_fraction, level_for_rank
from lightreg.penalties.contract import Penalty, Step
from lightreg.penalties.coupled_group_lasso import JointSteps, joint_prox_
from lightreg.proximal.ramp import (Point, SparsityWindow, check_known_length, check_point, check_ramp, default_interval,
                                    resolve_window)

#: One param group's prox work: the names, the tensors the penalty acts on, their steps (one float or one each)
#: and the group's lr.
Work = tuple[Sequence[str], Sequence[Tensor], float | Sequence[Step], float]


def selection_dtype(params: Sequence[Tensor]) -> torch.dtype:
    """The precision levels are compared in: float64 if any parameter is float64, else float32."""
    return torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32


def _identity(counts: Tensor) -> Tensor:
    return counts


def _counted(tensors: Sequence[Any], reduction: ShardReduction | None) -> Iterable[bool]:
    # Each unit must enter the counts once over all ranks: a replica's shard is left out on all but one rank.
    return reduction.counted if reduction is not None else [True] * len(tensors)


def zero_fraction(penalty: Penalty, tensors: Sequence[Tensor], reduction: ShardReduction | None = None) -> Tensor:
    """The fraction of units (entries; groups for ``GroupLasso``) of ``tensors`` that are exactly zero.

    With a ``reduction`` (``lightreg.base.distributed.shard_reduction`` of the parameters ``tensors`` act for),
    the counts of all ranks add up; every rank must call it.

    Example:
        >>> from lightreg import L1
        >>> zero_fraction(L1(1.0), [torch.tensor([0.0, 2.0]), torch.zeros(2)])
        tensor(0.7500)
    """
    if getattr(penalty, "joint", False):  # counted in its groups, not entries (CoupledGroupLasso: replicated, not sharded)
        return penalty.zero_fraction()
    counts = torch.zeros(2, dtype=torch.int64, device=tensors[0].device if tensors else "cpu")
    for w, counted in zip(tensors, _counted(tensors, reduction), strict=True):
        if counted:
            levels = penalty.zero_levels(w, 1.0)
            counts += torch.stack([(levels == 0).sum(), torch.tensor(levels.numel(), device=counts.device)])
    counts = (reduction or _identity)(counts)
    return counts[0] / counts[1].clamp(min=1)


class TargetSparsity:
    """The state of a target: the window, the last level, the steps seen and the zero pattern held or frozen.

    Args:
        target: the final fraction of zero units, in (0, 1).
        ramp, debias: see :func:`lightreg.proximal.ramp.resolve_window`.
        every: select the level exactly every ``every`` steps of the ramp (and always at its last step before
            the freeze); in between the zero pattern of the last selection is held and the penalty is off.
            ``None`` (default): :func:`lightreg.proximal.ramp.default_interval` of the window; 1 tracks the
            target at every step.

    Example:
        >>> t = TargetSparsity(0.9); t.setup(3000); t.window, t.interval
        (SparsityWindow(start=0, end=2000, freeze=2000), 32)
    """

    def __init__(self, target: float, ramp: Sequence[Point] | None = None, debias: Point | None = None,
                 every: int | None = None) -> None:
        check_real("target_sparsity", target, low=float("-inf"))  # the range is (0, 1), said once below
        if not 0.0 < target < 1.0:
            raise ValueError(f"target_sparsity must be in (0, 1), got {target!r}")
        self.target, self.ramp, self.debias = target, ramp, debias
        self.every = None if every is None else check_int("target_every", every, low=1)
        if ramp is not None:
            check_ramp(ramp)
        if debias is not None:
            check_point("target_debias", debias)
        self.window: SparsityWindow | None = None
        self.interval = every or 1
        self.alpha = 0.0
        self.pending = False  # a selection fell on a step whose lr was 0 everywhere
        self.selected = False  # a level has been selected (there is a zero pattern to hold)
        self.seen = 0  # optimizer steps the callback saw (raw optimizers do not advance trainer.global_step)
        self.masks: dict[str, Tensor] = {}  # w != 0 (w *= mask); FreezeZeros keeps w == 0
        self.unit: str | None = None  # what the fraction counts, where the penalty says (CoupledGroupLasso: groups)

    def check(self, penalty: Penalty, mode: str, schedule: object) -> None:
        """Raise ``ValueError`` unless a target can drive ``penalty`` in ``mode`` (it sets alpha: no ``schedule``)."""
        if mode != "proximal" or not penalty.makes_zeros:
            raise ValueError(f"target_sparsity={self.target!r} needs mode='proximal' and a penalty whose prox makes "
                             f"zeros (L1, ElasticNet with l1_ratio > 0, L0, GroupLasso, CoupledGroupLasso), got {penalty!r} in "
                             f"mode={mode!r}")
        if schedule is not None:
            raise ValueError(f"target_sparsity sets alpha at every step; it takes no schedule, got {schedule!r}")
        if not penalty.levels_cover_all:
            raise ValueError(f"{penalty!r} takes no target_sparsity (its zero levels ignore the bias), got {self.target!r}")
        self.unit = getattr(penalty, "target_unit", None)

    def __str__(self) -> str:
        return f"target sparsity {self.target:g}, {self.window}, level selected every {self.interval} steps"

    def setup(self, total_steps: float) -> None:
        """Resolve the window for a fit of ``total_steps`` steps; a restored window is kept (exact resume).

        Raises ``ValueError`` naming what to set when the fit has no known length (``total_steps`` -1 or inf)
        and the window is given as fractions of the fit (the default ramp is).
        """
        if self.window is None:
            check_known_length(self.target, self.ramp, self.debias, total_steps)
            self.window = resolve_window(total_steps, self.ramp, self.debias)
        self.interval = self.every or default_interval(self.window)

    def fraction(self, step: int) -> float:
        """The ramped target at ``step``."""
        assert self.window is not None, "TargetSparsity.setup was not called"
        return self.window.fraction(self.target, step)

    def frozen(self, step: int) -> bool:
        assert self.window is not None, "TargetSparsity.setup was not called"
        return self.window.frozen(step)

    def due(self, step: int) -> bool:
        """Whether the level is selected exactly after ``step``: every ``interval`` steps from the ramp's start,
        and at the step before the freeze."""
        w = self.window
        assert w is not None, "TargetSparsity.setup was not called"
        return (step - w.start) % self.interval == 0 or (w.freeze is not None and step == w.freeze - 1)

    # ---- the step count -----------------------------------------------------------------------------
    def step_index(self, global_step: int) -> int:
        """The index of the optimizer step about to run (or running): ``trainer.global_step``, or the steps the
        callback saw when that is larger (raw optimizers under manual optimization leave it at 0)."""
        return max(global_step, self.seen)

    def count_step(self, global_step: int) -> int:
        """Count the step that just ran (from an optimizer step post-hook); return its index."""
        step = self.step_index(global_step)
        self.seen = step + 1
        return step

    # ---- the level, and the prox ----------------------------------------------------------------------
    def selects(self, step: int) -> bool:
        """Whether the level is selected after ``step`` (in the ramp, not frozen, some lr): a due step, the first
        one, or the first with an lr after a due step whose lr was 0."""
        return self.pending or self.due(step) or not self.selected

    def level(self, step: int, levels: Levels, dtype: torch.dtype, reduce: ShardReduction,
              count: Callable[[float, int], int] | None = None) -> float:
        """The level after optimizer step ``step``: the k-th of ``levels()`` on a selection step, else the last one;
        0 before the ramp and when frozen. ``k = count(fraction, n)`` of the ``n`` levels, default
        ``round(fraction * n)``."""
        if self.frozen(step) or step < self.window.start:  # type: ignore[union-attr]
            self.alpha = 0.0
        elif self.selects(step):
            fraction = self.fraction(step)
            self.alpha = (level_for_fraction(levels, fraction, dtype, reduce) if count is None else
                          level_for_rank(levels, functools.partial(count, fraction), dtype, reduce))
            self.pending, self.selected = False, True
        return self.alpha

    def prox_after_step(self, step: int, penalty: Penalty, work: Sequence[Work], reduction: ShardReduction | None,
                        apply: Callable[[Sequence[Tensor], Any, float], None] | None = None) -> None:
        """After optimizer step ``step``, on the param groups of ``work``: on a selection step, the prox at the level
        that zeroes the ramped target (a collective with a ``reduction``); in between, and in the frozen phase, the
        zero pattern of the last selection put back (``w *= mask``) instead, no prox. A step whose lr is 0 everywhere
        moved nothing: it is left alone (``|w| / 0`` is no level), and a selection due then waits for an lr.
        ``apply(tensors, steps, alpha)`` applies the prox (default ``penalty.apply_prox_``)."""
        named = [(n, w) for names, ws, _, _ in work for n, w in zip(names, ws, strict=True)]
        if self.frozen(step) or step < self.window.start:  # type: ignore[union-attr]
            self.alpha = 0.0
            self.apply_masks_(named)
        elif all(lr == 0 for *_, lr in work):
            self.pending |= self.due(step)
        elif not self.selects(step):
            self.apply_masks_(named)
        else:
            tensors = [w for _, ws, _, _ in work for w in ws]
            if getattr(penalty, "joint", False):  # groups span tensors and param groups: levels and prox over all at once
                levels = _joint_levels(penalty, work)
                alpha = self.level(step, levels, selection_dtype(tensors), reduction or _identity,
                                   functools.partial(penalty.groups_to_zero, levels()[0]))
                if math.isinf(alpha):  # the count reaches groups that hold a weight the step did not move (t = 0)
                    alpha = self.alpha = _largest_finite(levels()[0], self.target)
                if alpha != 0.0:
                    joint_prox_(penalty, work, alpha)
            else:
                levels = functools.partial(_zero_levels, penalty, work, list(_counted(tensors, reduction)))
                alpha = self.level(step, levels, selection_dtype(tensors), reduction or _identity)
                for _, ws, steps, lr in work:
                    if alpha != 0.0 and lr != 0:  # the prox at alpha 0 or lr 0 is the identity
                        (apply or penalty.apply_prox_)(ws, steps, alpha)
            if self.interval > 1:  # the zero pattern to hold until the next selection
                self.masks.update({n: w.detach() != 0 for n, w in named})

    def before_step(self, step: int, named: Callable[[], Sequence[tuple[str, Tensor]]]) -> None:
        """Record the zero pattern of parameters without a mask before a step that holds it moves the zeros: the
        first frozen step, a parameter new to the fit, a resume whose checkpoint could not hold the masks of sharded
        parameters (the weights still hold the zeros)."""
        if self.frozen(step) or (self.selected and self.interval > 1):
            self.freeze_missing(named())

    def metrics(self, name: str, penalty: Penalty, tensors: Sequence[Tensor], reduction: ShardReduction | None,
                step: int) -> dict[str, Tensor | float]:
        """``reg/<name>/sparsity`` (measured, a collective with a ``reduction``) and ``reg/<name>/target`` (ramped)."""
        return {f"reg/{name}/sparsity": zero_fraction(penalty, tensors, reduction),
                f"reg/{name}/target": self.fraction(step)}

    def ended_short(self, steps: int) -> str | None:
        """A warning when a fit that ran ``steps`` optimizer steps ended before the window that ends it on the
        target did (EarlyStopping, ``max_time``); ``None`` if it did not. ``sparsity()`` is called then only."""
        if self.window is None or self.window.covered_by(steps):
            return None
        counted = f" (the fraction of {self.unit} exactly zero)" if self.unit else ""
        return (f"the fit ended after {steps} optimizer steps, before the sparsity target's window did ({self.window}): "
                f"sparsity reached {{sparsity:.4f}}{counted} against target_sparsity={self.target!r} (ramped target at the end "
                f"{self.fraction(max(steps - 1, 0)):.4f}). For a fit that may stop early (EarlyStopping, max_time), "
                "give target_ramp as step counts that end before it can stop")

    # ---- the frozen zero pattern, and the checkpoint ------------------------------------------------
    def freeze_missing(self, named: Sequence[tuple[str, Tensor]]) -> None:
        """Record ``w != 0`` for every parameter without a mask yet (call before the step that would move zeros)."""
        for name, w in named:
            if name not in self.masks:
                self.masks[name] = w.detach() != 0

    def apply_masks_(self, named: Sequence[tuple[str, Tensor]]) -> None:
        """Put the recorded zeros back after a step: ``w *= mask`` (a parameter without a mask is left alone)."""
        for name, w in named:
            mask = self.masks.get(name)
            if mask is not None:  # read as uint8: 4x faster on CPU than bool, which converts first; same values
                w.mul_(mask.view(torch.uint8) if type(mask) is Tensor else mask)

    def state_dict(self, shareable: set[str]) -> dict[str, Any]:
        """The window, the level, the steps seen, and the masks of the ``shareable`` names (plain, not sharded, tensors)."""
        window = None if self.window is None else (self.window.start, self.window.end, self.window.freeze)
        masks = {n: m for n, m in self.masks.items() if n in shareable}
        return {"window": window, "alpha": self.alpha, "masks": masks, "seen": self.seen, "pending": self.pending,
                "selected": self.selected}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.window = None if state["window"] is None else SparsityWindow(*state["window"])
        self.alpha = state["alpha"]
        self.masks = dict(state["masks"])
        # A checkpoint of a release that selected at every step has none of these: the next step selects.
        self.seen, self.pending, self.selected = state.get("seen", 0), state.get("pending", False), state.get("selected", False)


def _largest_finite(levels: Tensor, target: float) -> float:
    """The level that zeroes every group that can die, when fewer can than the target counts: a group holding a
    nonzero weight that the step did not move (frozen, ``requires_grad=False``, or outside the optimizer) has level
    ``inf`` and is never zeroed. Warns with how many groups can die."""
    finite = levels[levels.isfinite()]
    warnings.warn(f"target_sparsity={target!r}: only {finite.numel()} of {levels.numel()} coupled groups can reach "
                  "zero; the others hold weights the optimizer does not move (frozen, or not in an optimizer), which "
                  "the target never zeroes", stacklevel=4)
    return float(finite.max()) if finite.numel() else 0.0


def _joint_levels(penalty: Penalty, work: Sequence[Work]) -> Levels:
    """The zero levels of a joint penalty's groups (``CoupledGroupLasso.joint_zero_levels``) over every tensor of
    ``work``, computed once and handed to each pass of the selection as a fresh copy (a pass overwrites its input).
    A param group whose lr is 0 has the step 0: its nonzero groups get level ``inf``, as in ``_zero_levels``."""
    levels = penalty.joint_zero_levels([w for _, ws, _, _ in work for w in ws], JointSteps([(ws, st) for _, ws, st, _ in work]))
    return lambda: [levels.clone()]


def _zero_levels(penalty: Penalty, work: Sequence[Work], counted: Sequence[bool]) -> Iterator[Tensor]:
    """The zero levels of the counted tensors of ``work``, one tensor at a time: indexed, so that a step computed
    on demand (``LazySteps``) is freed before the next one is made. A group whose lr is 0 cannot move: its zero
    units have level 0 and the others ``inf`` (the limit of ``|w| / t`` as ``t -> 0``; ``0 / 0`` is not read)."""
    k = 0
    for _, ws, steps, lr in work:
        for i, w in enumerate(ws):
            if counted[k]:
                if lr == 0:
                    levels = penalty.zero_levels(w, 1.0)
                    yield levels.masked_fill_(levels != 0, math.inf)
                else:
                    yield penalty.zero_levels(w, steps if isinstance(steps, (int, float)) else steps[i])
            k += 1
