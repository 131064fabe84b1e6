"""The schedule of a sparsity target: the cubic ramp of Zhu & Gupta (2017) and the window of optimizer steps.

The target rises as ``s_t = s_f * (1 - (1 - p)³)``, ``p`` the progress through the ramp window ``[start,
end)``; from ``freeze`` on the zero pattern is frozen and the penalty is off (the debias phase). Points of
the fit are optimizer steps (ints) or fractions of the fit's steps (floats in [0, 1]).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from lightreg.base.checks import check_int, check_real

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


def check_point(name: str, value: object) -> None:
    """Raise unless ``value`` is a step (int >= 0) or a fraction of the fit (float in [0, 1])."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a step (int) or a fraction of the fit (float in [0, 1]), got {value!r}")
    if isinstance(value, int):
        check_int(name, value, low=0)
    else:
        check_real(name, value, high=1.0)


def known_length(total_steps: float) -> float:
    """``total_steps`` if it is a length, else ``inf``: Lightning's estimate is ``-1`` or ``inf`` for a fit of unknown
    length (a data stream without ``len`` and no ``max_steps``)."""
    return total_steps if math.isfinite(total_steps) and total_steps > 0 else math.inf


def _point(name: str, value: Point, total: float) -> int:
    check_point(name, value)
    if isinstance(value, int):
        return value
    if not math.isfinite(total):
        raise ValueError(f"{name}={value!r} is a fraction of the fit, but the fit has no known length: set "
                         "Trainer(max_steps=...), or give target_ramp as step counts (ints) and no target_debias")
    return round(value * total)


def check_known_length(target: float, ramp: Sequence[Point] | None, debias: Point | None, total_steps: float) -> None:
    """Raise ``ValueError`` saying what to set when a window given as fractions of the fit (the default ramp is)
    meets a fit of unknown length (``total_steps`` -1 or inf: a data stream without ``len`` and no ``max_steps``)."""
    # A debias phase, in steps or as a fraction, is the end of the fit: it needs the fit's length either way.
    if known_length(total_steps) == math.inf and (debias is not None or any(isinstance(p, float) for p in ramp or (0, 2 / 3))):
        raise ValueError(
            f"target_sparsity={target!r} places its ramp at fractions of the fit (target_ramp={tuple(ramp or (0, '2/3'))}, "
            f"target_debias={debias!r}), but this fit has no known length (trainer.estimated_stepping_batches = "
            f"{total_steps}: a data stream without len and no max_steps): set Trainer(max_steps=...), or give "
            "target_ramp=(start, end) as step counts (ints) and no target_debias (the zeros are then frozen at the "
            "ramp's end)")


def check_ramp(ramp: object) -> None:
    """Raise unless ``ramp`` is a pair ``(start, end)`` of points, start before end when comparable."""
    if isinstance(ramp, (str, bytes)) or not isinstance(ramp, Sequence) or len(ramp) != 2:
        raise TypeError(f"target_ramp must be a pair (start, end), got {ramp!r}")
    for name, value in zip(("target_ramp start", "target_ramp end"), ramp):
        check_point(name, value)
    if all(isinstance(v, int) for v in ramp) or all(isinstance(v, float) for v in ramp):
        if not ramp[0] < ramp[1]:
            raise ValueError(f"target_ramp must start before it ends, got {tuple(ramp)!r}")


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

    def covered_by(self, steps: int) -> bool:
        """Whether a fit of ``steps`` optimizer steps reaches the end of the ramp and the freeze."""
        return steps >= max(self.end, self.freeze or 0)


def resolve_window(total_steps: float, ramp: Sequence[Point] | None = None, debias: Point | None = None) -> SparsityWindow:
    """The window of a fit of ``total_steps`` optimizer steps (``inf``, ``-1`` or ``0`` when unknown).

    Args:
        total_steps: the fit's optimizer steps (``trainer.estimated_stepping_batches``).
        ramp: ``(start, end)`` of the ramp; default ``(0, 2/3 of the fit)``.
        debias: the length of the final frozen phase (penalty off, zeros kept); default: from the end of
            the ramp on (also in a fit of unknown length); ``0``: no freezing, the level keeps tracking the target.

    Example:
        >>> resolve_window(300)
        SparsityWindow(start=0, end=200, freeze=200)
        >>> resolve_window(300, ramp=(0.1, 0.5), debias=0.25)
        SparsityWindow(start=30, end=150, freeze=225)
    """
    if ramp is None:
        ramp = (0, 2 / 3)
    check_ramp(ramp)
    total_steps = known_length(total_steps)
    start, end = _point("target_ramp start", ramp[0], total_steps), _point("target_ramp end", ramp[1], total_steps)
    if not start < end:
        raise ValueError(f"target_ramp must start before it ends, got {tuple(ramp)!r} = steps ({start}, {end})")
    if debias is None:
        freeze: int | None = end
    else:
        length = _point("target_debias", debias, total_steps)
        freeze = None if length == 0 else (round(total_steps) - length if math.isfinite(total_steps) else None)
        if length and freeze is None:
            raise ValueError(f"target_debias={debias!r} needs a fit of known length (set max_steps or max_epochs)")
    if freeze is not None and freeze < end:
        raise ValueError(f"target_debias={debias!r} would freeze the zeros at step {freeze}, before the ramp "
                         f"ends at step {end} (target_ramp={tuple(ramp)!r}, {total_steps:g} steps in the fit)")
    return SparsityWindow(start, end, freeze)


#: The most optimizer steps between two exact selections of the level by default, and the fewest selections per ramp.
MAX_INTERVAL, MIN_SELECTIONS = 32, 32


def default_interval(window: SparsityWindow) -> int:
    """The default ``target_every``: ``clamp(ramp length // 32, 1, 32)`` steps between exact selections.

    At least 32 exact selections over the ramp (a ramp of fewer than 64 steps selects at every step), and at
    most 32 steps apart: a selection and its prox cost about five prox passes (two histogram passes recompute
    the levels), a step in between one pass (the zero pattern put back), so 32 steps apart the target costs
    about a third of a prox per step. (Gradual magnitude pruning prunes every 100 to 1000 steps.)

    Example:
        >>> default_interval(SparsityWindow(0, 50, 50)), default_interval(SparsityWindow(0, 340, 340))
        (1, 10)
        >>> default_interval(SparsityWindow(100, 20_100, None))
        32
    """
    return max(1, min(MAX_INTERVAL, (window.end - window.start) // MIN_SELECTIONS))
