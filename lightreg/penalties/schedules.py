"""Schedules for the penalty strength: callables ``step -> factor`` that multiply ``alpha``.

``step`` is the number of optimizer steps already taken (Lightning's ``trainer.global_step``), so the
first step sees ``step = 0``. Any callable with that signature works; these are the usual shapes.
"""

from __future__ import annotations

import math

from lightreg.base.checks import check_int, check_real


class LinearWarmup:
    """``factor(step) = start + (1 - start) * min(step / warmup_steps, 1)``.

    Lets the model fit first and ramps the penalty in, so L1 does not zero weights that are still
    random.

    Args:
        warmup_steps: steps to reach the full strength, >= 1.
        start: factor at step 0, in [0, 1].

    Example:
        >>> [LinearWarmup(4)(s) for s in (0, 2, 4, 10)]
        [0.0, 0.5, 1.0, 1.0]
    """

    def __init__(self, warmup_steps: int, start: float = 0.0) -> None:
        self.warmup_steps = check_int("warmup_steps", warmup_steps, low=1)
        self.start = check_real("start", start, high=1.0)

    def __call__(self, step: int) -> float:
        return self.start + (1.0 - self.start) * min(step / self.warmup_steps, 1.0)

    def __repr__(self) -> str:
        return f"LinearWarmup(warmup_steps={self.warmup_steps}, start={self.start})"


class CosineSchedule:
    """``factor(step) = end + (start - end) * (1 + cos(pi * min(step / total_steps, 1))) / 2``.

    Half a cosine from ``start`` to ``end`` over ``total_steps``, then ``end``. ``start=0, end=1`` is
    a smooth ramp-up; the default ``start=1, end=0`` anneals the penalty away.

    Args:
        total_steps: length of the half period, >= 1.
        start: factor at step 0, >= 0.
        end: factor from ``total_steps`` on, >= 0.

    Example:
        >>> [round(CosineSchedule(10)(s), 3) for s in (0, 5, 10, 20)]
        [1.0, 0.5, 0.0, 0.0]
    """

    def __init__(self, total_steps: int, start: float = 1.0, end: float = 0.0) -> None:
        self.total_steps = check_int("total_steps", total_steps, low=1)
        self.start = check_real("start", start)
        self.end = check_real("end", end)

    def __call__(self, step: int) -> float:
        progress = min(step / self.total_steps, 1.0)
        return self.end + (self.start - self.end) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def __repr__(self) -> str:
        return f"CosineSchedule(total_steps={self.total_steps}, start={self.start}, end={self.end})"


class StepWindow:
    """``factor(step) = 1`` for ``start <= step < end``, else ``0``: the penalty on only in a window.

    Args:
        start: first step with the penalty on, >= 0.
        end: first step with it off again; ``None`` keeps it on to the end.

    Example:
        >>> [StepWindow(2, 4)(s) for s in range(6)]
        [0.0, 0.0, 1.0, 1.0, 0.0, 0.0]
    """

    def __init__(self, start: int = 0, end: int | None = None) -> None:
        self.start = check_int("start", start, low=0)
        self.end = None if end is None else check_int("end", end, low=self.start + 1)

    def __call__(self, step: int) -> float:
        return 1.0 if step >= self.start and (self.end is None or step < self.end) else 0.0

    def __repr__(self) -> str:
        return f"StepWindow(start={self.start}, end={self.end})"


def scheduled_factor(schedule: object, step: int) -> float:
    """Call ``schedule(step)`` and check the factor: finite and >= 0, else ``ValueError`` naming both."""
    if schedule is None:
        return 1.0
    factor = schedule(step)  # type: ignore[operator]
    try:
        return check_real(f"schedule({step}) of {schedule!r}", factor)
    except TypeError:
        return check_real(f"schedule({step}) of {schedule!r}", float(factor))  # a 0-d tensor, say
