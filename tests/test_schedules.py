"""Schedules: the factor curves, their argument checks, and the check on a user's callable."""

import pytest
import torch

from lightreg import CosineSchedule, LinearWarmup, StepWindow
from lightreg.penalties.schedules import scheduled_factor


def test_linear_warmup():
    s = LinearWarmup(10, start=0.2)
    assert [s(k) for k in (0, 5, 10, 100)] == pytest.approx([0.2, 0.6, 1.0, 1.0])


def test_cosine_goes_from_start_to_end_on_a_half_period():
    # Worked by hand: a quarter and three quarters of the half period sit at (1 -+ cos 45°) / 2 = (1 -+ 1/sqrt 2) / 2
    # of the way from start to end, i.e. 2 * 0.1464466 and 2 * 0.8535534 here.
    s = CosineSchedule(100, start=0.0, end=2.0)
    assert [s(k) for k in (0, 25, 50, 75, 100, 150)] == pytest.approx(
        [0.0, 0.2928932188, 1.0, 1.7071067812, 2.0, 2.0], abs=1e-10)
    assert [CosineSchedule(10)(k) for k in (0, 5, 10)] == pytest.approx([1.0, 0.5, 0.0], abs=1e-12)  # the default anneals


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
