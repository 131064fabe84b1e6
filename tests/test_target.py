"""Target sparsity, pure parts: the cubic ramp, the window, the level that zeroes the ramped fraction, the masks."""

import math

import pytest
import torch

from lightreg import L0, L1, GroupLasso
from lightreg.proximal.target import TargetSparsity
from lightreg.proximal.ramp import SparsityWindow, cubic_ramp, resolve_window


def test_cubic_ramp_is_zhu_and_gupta():
    for p in [0.0, 0.1, 0.5, 0.9, 1.0]:
        assert cubic_ramp(p) == pytest.approx(1 - (1 - p) ** 3, abs=1e-15)
    assert cubic_ramp(-1.0) == 0.0 and cubic_ramp(3.0) == 1.0


def test_window_fraction_ramps_from_start_to_end_then_holds():
    w = SparsityWindow(start=10, end=20, freeze=25)
    assert w.fraction(0.9, 9) == 0.0
    assert w.fraction(0.9, 10) == pytest.approx(0.9 * (1 - 0.9**3))
    assert w.fraction(0.9, 19) == 0.9 and w.fraction(0.9, 30) == 0.9  # the last ramp step is at the target
    assert [w.frozen(s) for s in (24, 25, 99)] == [False, True, True]


@pytest.mark.parametrize("kwargs,total,expected", [
    ({}, 300, (0, 200, 200)),
    ({"ramp": (10, 100)}, 300, (10, 100, 100)),
    ({"ramp": (0.0, 0.5), "debias": 0.25}, 300, (0, 150, 225)),
    ({"ramp": (5, 50), "debias": 0}, 300, (5, 50, None)),
    ({"ramp": (5, 50), "debias": 0}, math.inf, (5, 50, None)),
    ({"ramp": (5, 50)}, math.inf, (5, 50, 50)),  # unknown length: the default debias still freezes at the ramp's end
    ({"ramp": (5, 50)}, -1, (5, 50, 50)),  # Lightning's estimate for a data stream without len
])
def test_window_resolution(kwargs, total, expected):
    assert resolve_window(total, **kwargs) == SparsityWindow(*expected)


@pytest.mark.parametrize("kwargs,exc,words", [
    ({"target": 1.0}, ValueError, "in (0, 1)"),
    ({"target": 0.0}, ValueError, "in (0, 1)"),
    ({"target": "0.9"}, TypeError, "target_sparsity"),
    ({"target": 0.9, "ramp": (50, 10)}, ValueError, "start before it ends"),
    ({"target": 0.9, "ramp": (0, 1.5)}, ValueError, "target_ramp end"),
    ({"target": 0.9, "ramp": 10}, TypeError, "pair"),
    ({"target": 0.9, "debias": -1}, ValueError, "target_debias"),
    ({"target": 0.9, "every": 0}, ValueError, "target_every"),
])
def test_bad_arguments_name_the_argument_and_value(kwargs, exc, words):
    with pytest.raises(exc, match=words.replace("(", r"\(").replace(")", r"\)")):
        TargetSparsity(**kwargs)


def test_window_errors_that_need_the_fit_length():
    with pytest.raises(ValueError, match="no known length"):
        resolve_window(math.inf)
    with pytest.raises(ValueError, match="before the ramp ends"):
        resolve_window(300, ramp=(0, 250), debias=100)


@pytest.mark.parametrize("penalty", [L1(0.0), L0(0.0), GroupLasso(0.0, dim=0)], ids=repr)
def test_the_level_makes_the_prox_zero_exactly_the_ramped_fraction(penalty):
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(s, generator=g) for s in [(40, 30), (25, 8), (60, 4)]]
    ts = [torch.rand(w.shape, generator=g) * 1e-2 + 1e-4 for w in ws]
    target = TargetSparsity(0.8, ramp=(0, 10), debias=0)
    target.setup(20)
    units = sum(w.shape[0] for w in ws) if isinstance(penalty, GroupLasso) else sum(w.numel() for w in ws)
    for step in [0, 3, 9, 15]:
        alpha = target.level(step, lambda: [penalty.zero_levels(w, t) for w, t in zip(ws, ts)], torch.float32, lambda h: h)
        out = [penalty.prox(w, t, alpha) for w, t in zip(ws, ts)]
        if isinstance(penalty, GroupLasso):
            zeros = sum(int((o == 0).all(dim=1).sum()) for o in out)
        else:
            zeros = sum(int((o == 0).sum()) for o in out)
        assert zeros == math.floor(target.fraction(step) * units + 0.5), step


def test_levels_are_kept_between_selections_and_off_before_the_ramp_and_when_frozen():
    target = TargetSparsity(0.5, ramp=(2, 8), every=3)
    target.setup(12)  # frozen from step 8
    calls = []

    def levels():
        calls.append(1)
        return [torch.arange(100.0)]

    alphas = [target.level(s, levels, torch.float32, lambda h: h) for s in range(12)]
    assert alphas[:2] == [0.0, 0.0] and alphas[8:] == [0.0] * 4
    assert alphas[3] == alphas[2] and alphas[4] == alphas[2] and alphas[5] > alphas[4]  # selections at 2, 5, 7
    assert alphas[7] == pytest.approx(49.0, rel=1e-6)  # step 7 = freeze - 1: exactly the final target
    assert len(calls) == 3 * 2  # 3 selections, 2 histogram passes each (float32)


def test_masks_freeze_the_zero_pattern_and_round_trip_through_the_state():
    w = torch.tensor([[0.0, 1.0], [2.0, 0.0]])
    target = TargetSparsity(0.5, ramp=(0, 4))
    target.setup(6)
    target.freeze_missing([("a", w)])
    w += 1.0
    target.apply_masks_([("a", w)])
    assert torch.equal(w, torch.tensor([[0.0, 2.0], [3.0, 0.0]]))
    state = target.state_dict(shareable={"a"})
    restored = TargetSparsity(0.5)
    restored.load_state_dict(state)
    assert restored.window == target.window and torch.equal(restored.masks["a"], target.masks["a"])
    assert target.state_dict(shareable=set())["masks"] == {}
