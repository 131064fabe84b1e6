"""Target sparsity: the penalty level that zeroes a requested, gradually ramped fraction of the weights.

Level tracking, not a controller. A penalty whose prox makes zeros zeroes a unit (an entry, or a group for
``GroupLasso``) exactly when its *zero level* is at most alpha: ``|w_i| / t_i`` for ``L1`` (``/ l1_ratio``
for ``ElasticNet``), ``w_i² / (2 t_i)`` for ``L0``, ``||w_g / t_g|| / sqrt(|g|)`` for ``GroupLasso``,
``t`` the prox step (``Penalty.zero_levels``). So at every step of the ramp, right after the optimizer step,
alpha is set to the k-th smallest zero level over the whole selection, ``k = round(s_t * n)``, and the prox
zeroes exactly the ramped target ``s_t`` (more only on ties). The target follows the cubic schedule of
Zhu & Gupta (2017), ``s_t = s_f * (1 - (1 - p)³)``, ``p`` the progress through the ramp window. After the
ramp (from ``freeze`` on) the zero pattern is frozen (a mask re-applied after every step) and the penalty is
off, so the surviving weights lose the penalty's shrinkage bias (the debias phase).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightreg._checks import check_int, check_real
from lightreg.distributed import complete_over_shards, is_dtensor
from lightreg.kth_value import Levels, Reduce, level_for_fraction
from lightreg.penalty import Penalty

#: A point of the fit: an optimizer step (int), or a fraction of all the fit's steps (float in [0, 1]).
Point = int | float


def cubic_ramp(progress: float) -> float:
    """``1 - (1 - p)³`` for ``p`` clipped to [0, 1]: fast at first, flat at the end (Zhu & Gupta).

    Example:
        >>> cubic_ramp(0.0), cubic_ramp(0.5), cubic_ramp(2.0)
        (0.0, 0.875, 1.0)
    """
    p = min(max(progress, 0.0), 1.0)
    return 1.0 - (1.0 - p) ** 3


def _check_point(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a step (int) or a fraction of the fit (float in [0, 1]), got {value!r}")
    if isinstance(value, int):
        check_int(name, value, low=0)
    else:
        check_real(name, value, high=1.0)


def _point(name: str, value: Point, total: float) -> int:
    _check_point(name, value)
    if isinstance(value, int):
        return value
    if not math.isfinite(total):
        raise ValueError(f"{name}={value!r} is a fraction of the fit, but the fit has no known length "
                         "(set max_steps or max_epochs, or give steps as ints)")
    return round(value * total)


def _check_ramp(ramp: object) -> None:
    if isinstance(ramp, (str, bytes)) or not isinstance(ramp, Sequence) or len(ramp) != 2:
        raise TypeError(f"target_ramp must be a pair (start, end), got {ramp!r}")
    for name, value in zip(("target_ramp start", "target_ramp end"), ramp):
        _check_point(name, value)
    if all(isinstance(v, int) for v in ramp) or all(isinstance(v, float) for v in ramp):
        if not ramp[0] < ramp[1]:
            raise ValueError(f"target_ramp must start before it ends, got {tuple(ramp)!r}")


def selection_dtype(params: Sequence[Tensor]) -> torch.dtype:
    """The precision levels are compared in: float64 if any parameter is float64, else float32."""
    return torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32


def levels_reduce(params: Sequence[Tensor]) -> Reduce:
    """Sums per-rank counts over the ranks that shard the parameters (FSDP2); the identity otherwise.

    Every rank computes the same levels of the same weights under DDP, so nothing rank-local enters there.
    """
    sharded = next((p for p in params if is_dtensor(p)), None)
    if sharded is None:
        return lambda counts: counts
    return lambda counts: complete_over_shards(counts, sharded, keep_dim=None)


def zero_fraction(penalty: Penalty, tensors: Sequence[Tensor], reduce: Reduce) -> Tensor:
    """The fraction of units (entries; groups for ``GroupLasso``) of ``tensors`` that are exactly zero.

    Example:
        >>> from lightreg import L1
        >>> zero_fraction(L1(1.0), [torch.tensor([0.0, 2.0]), torch.zeros(2)], lambda c: c)
        tensor(0.7500)
    """
    counts = torch.zeros(2, dtype=torch.int64, device=tensors[0].device if tensors else "cpu")
    for w in tensors:
        levels = penalty.zero_levels(w, 1.0)
        counts += torch.stack([(levels == 0).sum(), torch.tensor(levels.numel(), device=counts.device)])
    counts = reduce(counts)
    return counts[0] / counts[1].clamp(min=1)


@dataclass(frozen=True)
class SparsityWindow:
    """In optimizer steps: the ramp runs over ``[start, end)``, the zero pattern is frozen from ``freeze`` on."""

    start: int
    end: int
    freeze: int | None

    def fraction(self, target: float, step: int) -> float:
        """The ramped target at ``step``: 0 before ``start``, ``target`` from ``end`` on."""
        if step < self.start:
            return 0.0
        return target * cubic_ramp((step - self.start + 1) / max(self.end - self.start, 1))

    def frozen(self, step: int) -> bool:
        return self.freeze is not None and step >= self.freeze


def resolve_window(total_steps: float, ramp: Sequence[Point] | None = None, debias: Point | None = None) -> SparsityWindow:
    """The window of a fit of ``total_steps`` optimizer steps (``inf`` when unknown).

    Args:
        total_steps: the fit's optimizer steps (``trainer.estimated_stepping_batches``).
        ramp: ``(start, end)`` of the ramp; default ``(0, 2/3 of the fit)``.
        debias: the length of the final frozen phase (penalty off, zeros kept); default: from the end of
            the ramp to the end of the fit; ``0``: no freezing, the level keeps tracking the target.

    Example:
        >>> resolve_window(300)
        SparsityWindow(start=0, end=200, freeze=200)
        >>> resolve_window(300, ramp=(0.1, 0.5), debias=0.25)
        SparsityWindow(start=30, end=150, freeze=225)
    """
    if ramp is None:
        ramp = (0, 2 / 3)
    _check_ramp(ramp)
    start, end = _point("target_ramp start", ramp[0], total_steps), _point("target_ramp end", ramp[1], total_steps)
    if not start < end:
        raise ValueError(f"target_ramp must start before it ends, got {tuple(ramp)!r} = steps ({start}, {end})")
    if debias is None:
        freeze: int | None = end if math.isfinite(total_steps) else None
    else:
        length = _point("target_debias", debias, total_steps)
        freeze = None if length == 0 else (round(total_steps) - length if math.isfinite(total_steps) else None)
        if length and freeze is None:
            raise ValueError(f"target_debias={debias!r} needs a fit of known length (set max_steps or max_epochs)")
    if freeze is not None and freeze < end:
        raise ValueError(f"target_debias={debias!r} would freeze the zeros at step {freeze}, before the ramp "
                         f"ends at step {end} (target_ramp={tuple(ramp)!r}, {total_steps:g} steps in the fit)")
    return SparsityWindow(start, end, freeze)


class TargetSparsity:
    """The state of a target: the window, the last level and the frozen zero pattern.

    Args:
        target: the final fraction of zero units, in (0, 1).
        ramp, debias: see :func:`resolve_window`.
        every: select the level every ``every`` steps of the ramp (and at its last step); in between the
            last level is kept. 1 (default) tracks the target exactly at every step.

    Example:
        >>> t = TargetSparsity(0.9); t.setup(300); t.window
        SparsityWindow(start=0, end=200, freeze=200)
    """

    def __init__(self, target: float, ramp: Sequence[Point] | None = None, debias: Point | None = None, every: int = 1) -> None:
        check_real("target_sparsity", target)
        if not 0.0 < target < 1.0:
            raise ValueError(f"target_sparsity must be in (0, 1), got {target!r}")
        self.target, self.ramp, self.debias = target, ramp, debias
        self.every = check_int("target_every", every, low=1)
        if ramp is not None:
            _check_ramp(ramp)
        if debias is not None:
            _check_point("target_debias", debias)
        self.window: SparsityWindow | None = None
        self.alpha = 0.0
        self.masks: dict[str, Tensor] = {}

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

    # ---- the frozen zero pattern --------------------------------------------------------------------
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
