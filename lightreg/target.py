"""Target sparsity: the penalty level that zeroes a requested, gradually ramped fraction of the weights.

Level tracking, not a controller. A penalty whose prox makes zeros zeroes a unit (an entry, or a group for
``GroupLasso``) exactly when its *zero level* is at most alpha: ``|w_i| / t_i`` for ``L1`` (``/ l1_ratio``
for ``ElasticNet``), ``w_i² / (2 t_i)`` for ``L0``, ``||w_g / t_g|| / sqrt(|g|)`` for ``GroupLasso``,
``t`` the prox step (``Penalty.zero_levels``). So at every step of the ramp, right after the optimizer step,
alpha is set to the k-th smallest zero level over the whole selection, ``k = round(s_t * n)``, and the prox
zeroes exactly the ramped target ``s_t`` (more only on ties). The target follows the cubic schedule of
Zhu & Gupta (2017) over a window of steps (``lightreg.target_window``). After the ramp (from ``freeze`` on)
the zero pattern is frozen (a mask re-applied after every step) and the penalty is off, so the surviving
weights lose the penalty's shrinkage bias (the debias phase).

:class:`TargetSparsity` holds that state and does this work for the ``Regularizer``, whose hooks call it in
one line each: the level before the prox, the masks in the frozen phase, the checkpoint state, the metrics.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from lightreg._checks import check_int, check_real
from lightreg.kth_value import Levels, Reduce, level_for_fraction
from lightreg.penalty import Penalty, Step
from lightreg.statistics import Reduction
from lightreg.target_window import Point, SparsityWindow, check_point, check_ramp, resolve_window

#: One param group's prox work: the names, the tensors the penalty acts on, and their steps (one float or one each).
Work = tuple[Sequence[str], Sequence[Tensor], float | Sequence[Step]]


def selection_dtype(params: Sequence[Tensor]) -> torch.dtype:
    """The precision levels are compared in: float64 if any parameter is float64, else float32."""
    return torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32


def _identity(counts: Tensor) -> Tensor:
    return counts


def _counted(tensors: Sequence[Any], reduction: Reduction | None) -> Iterable[bool]:
    # Each unit must enter the counts once over all ranks: a replica's shard is left out on all but one rank.
    return reduction.counted if reduction is not None else [True] * len(tensors)


def zero_fraction(penalty: Penalty, tensors: Sequence[Tensor], reduction: Reduction | None = None) -> Tensor:
    """The fraction of units (entries; groups for ``GroupLasso``) of ``tensors`` that are exactly zero.

    With a ``reduction`` (``lightreg.distributed.shard_reduction`` of the parameters ``tensors`` act for),
    the counts of all ranks add up; every rank must call it.

    Example:
        >>> from lightreg import L1
        >>> zero_fraction(L1(1.0), [torch.tensor([0.0, 2.0]), torch.zeros(2)])
        tensor(0.7500)
    """
    counts = torch.zeros(2, dtype=torch.int64, device=tensors[0].device if tensors else "cpu")
    for w, counted in zip(tensors, _counted(tensors, reduction), strict=True):
        if counted:
            levels = penalty.zero_levels(w, 1.0)
            counts += torch.stack([(levels == 0).sum(), torch.tensor(levels.numel(), device=counts.device)])
    counts = (reduction or _identity)(counts)
    return counts[0] / counts[1].clamp(min=1)


class TargetSparsity:
    """The state of a target: the window, the last level and the frozen zero pattern.

    Args:
        target: the final fraction of zero units, in (0, 1).
        ramp, debias: see :func:`lightreg.target_window.resolve_window`.
        every: select the level every ``every`` steps of the ramp (and at its last step); in between the
            last level is kept. 1 (default) tracks the target exactly at every step.

    Example:
        >>> t = TargetSparsity(0.9); t.setup(300); t.window
        SparsityWindow(start=0, end=200, freeze=200)
    """

    def __init__(self, target: float, ramp: Sequence[Point] | None = None, debias: Point | None = None, every: int = 1) -> None:
        check_real("target_sparsity", target, low=float("-inf"))  # the range is (0, 1), said once below
        if not 0.0 < target < 1.0:
            raise ValueError(f"target_sparsity must be in (0, 1), got {target!r}")
        self.target, self.ramp, self.debias = target, ramp, debias
        self.every = check_int("target_every", every, low=1)
        if ramp is not None:
            check_ramp(ramp)
        if debias is not None:
            check_point("target_debias", debias)
        self.window: SparsityWindow | None = None
        self.alpha = 0.0
        self.masks: dict[str, Tensor] = {}

    def check(self, penalty: Penalty, mode: str, schedule: object) -> None:
        """Raise ``ValueError`` unless a target can drive ``penalty`` in ``mode`` (it sets alpha: no ``schedule``)."""
        if mode != "proximal" or not penalty.makes_zeros:
            raise ValueError(f"target_sparsity={self.target!r} needs mode='proximal' and a penalty whose prox makes "
                             f"zeros (L1, ElasticNet with l1_ratio > 0, L0, GroupLasso), got {penalty!r} in mode={mode!r}")
        if schedule is not None:
            raise ValueError(f"target_sparsity sets alpha at every step; it takes no schedule, got {schedule!r}")
        if getattr(penalty, "with_bias", False):
            raise ValueError(f"{penalty!r} takes no target_sparsity (its zero levels ignore the bias), got {self.target!r}")

    def __str__(self) -> str:
        return f"target sparsity {self.target:g}, {self.window}"

    def setup(self, total_steps: float) -> None:
        """Resolve the window for a fit of ``total_steps`` steps; a restored window is kept (exact resume)."""
        if self.window is None:
            self.window = resolve_window(total_steps, self.ramp, self.debias)

    def fraction(self, step: int) -> float:
        """The ramped target at ``step``."""
        assert self.window is not None, "TargetSparsity.setup was not called"
        return self.window.fraction(self.target, step)

    def frozen(self, step: int) -> bool:
        assert self.window is not None, "TargetSparsity.setup was not called"
        return self.window.frozen(step)

    def level(self, step: int, levels: Levels, dtype: torch.dtype, reduce: Reduce) -> float:
        """The alpha to use after optimizer step ``step``; selects it anew on the steps that need it."""
        assert self.window is not None, "TargetSparsity.setup was not called"
        w = self.window
        if self.frozen(step) or step < w.start:
            self.alpha = 0.0
        elif (step - w.start) % self.every == 0 or (w.freeze is not None and step == w.freeze - 1):
            self.alpha = level_for_fraction(levels, self.fraction(step), dtype, reduce)
        return self.alpha

    # ---- what the Regularizer calls around each optimizer step --------------------------------------
    def alpha_after_step(self, step: int, penalty: Penalty, work: Sequence[Work], reduction: Reduction | None) -> float:
        """The alpha of the prox after optimizer step ``step``, over the prox ``work`` of its param groups.

        On the ramp's steps: the level that zeroes the ramped target (a collective with a ``reduction``).
        In the frozen phase: 0 (no prox), and the recorded zeros are put back (``w *= mask``) instead.
        """
        if self.frozen(step):
            self.apply_masks_([(n, w) for names, ws, _ in work for n, w in zip(names, ws, strict=True)])
            return 0.0
        tensors = [w for _, ws, _ in work for w in ws]
        levels = functools.partial(_zero_levels, penalty, work, list(_counted(tensors, reduction)))
        return self.level(step, levels, selection_dtype(tensors), reduction or _identity)

    def before_step(self, step: int, named: Callable[[], Sequence[tuple[str, Tensor]]]) -> None:
        """Record the zero pattern of ``named()`` before the first frozen step moves the zeros (and again after a
        resume whose checkpoint could not hold the masks of sharded parameters: the weights still hold the zeros)."""
        if self.frozen(step):
            self.freeze_missing(named())

    def metrics(self, name: str, penalty: Penalty, tensors: Sequence[Tensor], reduction: Reduction | None,
                step: int) -> dict[str, Tensor | float]:
        """``reg/<name>/sparsity`` (measured, a collective with a ``reduction``) and ``reg/<name>/target`` (ramped)."""
        return {f"reg/{name}/sparsity": zero_fraction(penalty, tensors, reduction),
                f"reg/{name}/target": self.fraction(step)}

    # ---- the frozen zero pattern, and the checkpoint ------------------------------------------------
    def freeze_missing(self, named: Sequence[tuple[str, Tensor]]) -> None:
        """Record ``w != 0`` for every parameter without a mask yet (call before the step that would move zeros)."""
        for name, w in named:
            if name not in self.masks:
                self.masks[name] = w.detach() != 0

    def apply_masks_(self, named: Sequence[tuple[str, Tensor]]) -> None:
        """Put the frozen zeros back after a step: ``w *= mask``."""
        for name, w in named:
            w.mul_(self.masks[name])

    def state_dict(self, shareable: set[str]) -> dict[str, Any]:
        """The window, the last level, and the masks of the ``shareable`` names (plain, not sharded, tensors)."""
        window = None if self.window is None else (self.window.start, self.window.end, self.window.freeze)
        masks = {n: m for n, m in self.masks.items() if n in shareable}
        return {"window": window, "alpha": self.alpha, "masks": masks}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.window = None if state["window"] is None else SparsityWindow(*state["window"])
        self.alpha = state["alpha"]
        self.masks = dict(state["masks"])


def _zero_levels(penalty: Penalty, work: Sequence[Work], counted: Sequence[bool]) -> Iterator[Tensor]:
    """The zero levels of the counted tensors of ``work``, one tensor at a time: indexed, so that a step computed
    on demand (``LazySteps``) is freed before the next one is made."""
    k = 0
    for _, ws, steps in work:
        for i, w in enumerate(ws):
            if counted[k]:
                yield penalty.zero_levels(w, steps if isinstance(steps, (int, float)) else steps[i])
            k += 1
