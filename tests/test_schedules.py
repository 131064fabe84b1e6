"""Schedules: the factor curves, their argument checks, and the check on a user's callable."""

import math

import pytest
import torch

from lightreg import CosineSchedule, LinearWarmup, StepWindow
from lightreg.schedules import scheduled_factor


def test_linear_warmup():
    s = LinearWarmup(10, start=0.2)
    assert [s(k) for k in (0, 5, 10, 100)] == pytest.approx([0.2, 0.6, 1.0, 1.0])


def test_cosine_goes_from_start_to_end_on_a_half_period():
    s = CosineSchedule(100, start=0.0, end=2.0)
    for k in (0, 13, 50, 77, 100, 150):
        expected = 2.0 - 2.0 * 0.5 * (1 + math.cos(math.pi * min(k / 100, 1)))
        assert s(k) == pytest.approx(expected)


def test_window():
    assert [StepWindow(1, 3)(k) for k in range(5)] == [0, 1, 1, 0, 0]
    assert StepWindow(2)(10**9) == 1.0


@pytest.mark.parametrize(
    "make, exc, word",
    [
        (lambda: LinearWarmup(0), ValueError, "warmup_steps"),
        (lambda: LinearWarmup(10, start=1.5), ValueError, "start"),
        (lambda: CosineSchedule(10.0), TypeError, "total_steps"),
        (lambda: CosineSchedule(10, end=-1), ValueError, "end"),
        (lambda: StepWindow(5, 5), ValueError, "end"),
        (lambda: StepWindow(-1), ValueError, "start"),
    ],
)
def test_bad_arguments(make, exc, word):
    with pytest.raises(exc, match=word):
        make()


def test_scheduled_factor_checks_what_a_callable_returns():
    assert scheduled_factor(None, 7) == 1.0
    assert scheduled_factor(lambda k: torch.tensor(0.5), 3) == 0.5
    with pytest.raises(ValueError, match=r"schedule\(4\)"):
        scheduled_factor(lambda k: -1.0, 4)
    with pytest.raises(ValueError, match="finite"):
        scheduled_factor(lambda k: float("nan"), 0)
