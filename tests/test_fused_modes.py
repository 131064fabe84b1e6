"""The one-pass gradient and decoupled kernels (``lightreg.penalties.mode_kernels``) against the eager steps.

Oracles: the eager steps they replace (bit for bit for the elementwise penalties, to rounding for GroupLasso, whose
row norms are summed in another order), autograd of the penalty written out from its formula (``tests.oracles``),
and, through a whole Lightning fit, the same fit with the kernels switched off (and with the penalty in the loss).
Sizes are not multiples of the vector width, so the loops' tails are covered.
"""

import warnings

import pytest
import torch

from lightreg import L1, L2, ElasticNet, GroupLasso, Regularizer
import lightreg.base.c_kernels as c_kernels
import lightreg.penalties.mode_kernels as mode_kernels
from tests.models import TinyNet, loader, regression_data, trainer
from tests.oracles import explicit_value

PENALTIES = [L1(0.3), ElasticNet(0.3, 0.7), ElasticNet(0.3, 1.0), ElasticNet(0.3, 0.0), GroupLasso(0.3),
             GroupLasso(0.3, dim=-2)]
SHAPES = [(7, 13), (3, 5, 17), (33,)]


def _tensors(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g, dtype=dtype)
    w.view(-1)[::5] = 0.0  # sign 0
    w.view(-1)[1::7] = -0.0
    if len(shape) > 1:
        w[1].zero_()  # an all-zero group
    return w, torch.randn(shape, generator=g, dtype=dtype)


@pytest.fixture
def kernels(monkeypatch):
    monkeypatch.setattr(mode_kernels, "BUILD_AFTER_ELEMENTS", 0)
    monkeypatch.setitem(mode_kernels._state, "failed", False)
    calls = []
    run = mode_kernels.run_

    def spy(name, tensors, *c):
        ran = run(name, tensors, *c)
        calls.append(name) if ran else None
        return ran

    for module in ("lightreg.penalties.elastic_net", "lightreg.penalties.group_lasso"):
        monkeypatch.setattr(f"{module}.run_", spy)
    return calls


def _eager(monkeypatch_context, fn):
    with monkeypatch_context() as m:
        m.setattr(mode_kernels, "BUILD_AFTER_ELEMENTS", float("inf"))
        fn()


def _exact(penalty):
    return not isinstance(penalty, GroupLasso)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("penalty", PENALTIES, ids=repr)
def test_the_kernels_equal_the_eager_steps(penalty, shape, dtype, kernels):
    if isinstance(penalty, GroupLasso) and not -len(shape) <= penalty.dim < len(shape):
        pytest.skip("dim out of range for a 1-D tensor")
    w, g = _tensors(shape, dtype)
    expected_g, expected_w = g.clone(), w.clone()
    _eager(pytest.MonkeyPatch.context, lambda: (penalty.add_gradient_(expected_g, w, 0.3),
                                                 penalty.decay_(expected_w, 0.05, 0.3)))
    got_g, got_w = g.clone(), w.clone()
    penalty.add_gradient_(got_g, w, 0.3)
    penalty.decay_(got_w, 0.05, 0.3)
    rows = isinstance(penalty, GroupLasso) and (penalty.dim % w.ndim != 0 or w.ndim < 2)
    assert len(kernels) == (0 if rows else 2)
    if _exact(penalty):
        assert torch.equal(got_g, expected_g) and torch.equal(got_w, expected_w)
        assert torch.equal(got_g.signbit(), expected_g.signbit()) and torch.equal(got_w.signbit(), expected_w.signbit())
    else:
        rtol = 1e-6 if dtype == torch.float32 else 1e-14
        torch.testing.assert_close(got_g, expected_g, rtol=rtol, atol=rtol)
        torch.testing.assert_close(got_w, expected_w, rtol=rtol, atol=rtol)
        assert torch.equal(got_w == 0, expected_w == 0)


@pytest.mark.parametrize("penalty", PENALTIES[:5], ids=repr)
def test_the_kernels_add_the_autograd_gradient_of_the_penalty(penalty, kernels):
    w, g = _tensors((7, 13), torch.float64, seed=1)
    w[1] = 0.5  # no all-zero group: autograd's gradient of a norm at 0 is NaN
    w = torch.where(w == 0, 0.25, w)  # autograd's d|w|/dw at 0 is 0, as sign(0): kept off the kink anyway
    leaf = w.clone().requires_grad_(True)
    explicit_value(penalty, leaf).backward()
    got_g, got_w = g.clone(), w.clone()
    penalty.add_gradient_(got_g, w, penalty.alpha)
    penalty.decay_(got_w, 0.05, penalty.alpha)
    assert len(kernels) == 2
    torch.testing.assert_close(got_g, g + leaf.grad, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(got_w, w - 0.05 * leaf.grad, rtol=1e-13, atol=1e-13)


def test_what_the_kernels_do_not_take_runs_the_eager_step(kernels):
    """A non-contiguous view, bfloat16, a gradient that aliases the weight, L2 (already one op): the eager code."""
    w, g = _tensors((6, 9), torch.float32)
    for penalty, gw in [(L1(0.3), (g.t(), w.t())), (L1(0.3), (g.bfloat16(), w.bfloat16())), (L1(0.3), (w.clone(),) * 2),
                        (L2(0.3), (g, w))]:
        penalty.add_gradient_(gw[0].clone() if gw[0] is not gw[1] else gw[0], gw[1], 0.3)
    assert kernels == []


def test_below_the_threshold_the_eager_steps_run_and_are_counted(monkeypatch):
    monkeypatch.setattr(mode_kernels, "BUILD_AFTER_ELEMENTS", 150)
    monkeypatch.setitem(mode_kernels._state, "eager_elements", 0)
    monkeypatch.setitem(mode_kernels._state, "failed", False)
    w, g = _tensors((7, 13), torch.float32)
    ran = [mode_kernels.run_("l1_gradient", (g, w), 0.1, 0.0) for _ in range(3)]
    assert ran == [False, False, True]  # 91 + 91 element-steps >= 150: built at the third


def test_a_missing_compiler_is_reported_once_and_the_eager_steps_continue(monkeypatch):
    monkeypatch.setattr(mode_kernels, "BUILD_AFTER_ELEMENTS", 0)
    monkeypatch.setattr(mode_kernels, "_state", {"eager_elements": 0, "failed": False, "lib": None})
    monkeypatch.setenv("CC", "no-such-compiler-lightreg")
    w, g = _tensors((7, 13), torch.float32)
    expected = g.clone().add_(w.sign(), alpha=0.3)
    with pytest.warns(UserWarning, match="one-pass gradient/decoupled kernels failed"):
        L1(0.3).add_gradient_(g, w, 0.3)
    assert torch.equal(g, expected)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        L1(0.3).add_gradient_(g, w, 0.3)


@pytest.mark.parametrize("mode", ["gradient", "decoupled"])
@pytest.mark.parametrize("penalty", [L1(0.01), ElasticNet(0.01, 0.5), GroupLasso(0.01)], ids=repr)
def test_a_fit_with_the_kernels_equals_the_eager_fit(penalty, mode, kernels, monkeypatch):
    fits = []
    for compile_after in (float("inf"), 0):
        monkeypatch.setattr(mode_kernels, "BUILD_AFTER_ELEMENTS", compile_after)
        model = TinyNet(optimizer="adam", lr=0.01, dtype=torch.float32)
        x, y = regression_data(dtype=torch.float32)
        trainer(max_epochs=2, callbacks=[Regularizer(penalty, mode=mode)]).fit(model, loader(x, y, 16))
        fits.append(torch.cat([p.detach().view(-1) for p in model.parameters()]))
        assert (len(kernels) > 0) == (compile_after == 0)
    if _exact(penalty):
        assert torch.equal(fits[0], fits[1])
    else:
        torch.testing.assert_close(fits[0], fits[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("penalty", [L1(0.3), ElasticNet(0.3, 0.5), GroupLasso(0.3)], ids=repr)
def test_the_threads_split_the_work_without_changing_a_bit(penalty, kernels, monkeypatch):
    w, g = _tensors((37, 11), torch.float64)
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            monkeypatch.setattr(c_kernels, "PARALLEL_ELEMENTS", 16)
            got_g, got_w = g.clone(), w.clone()
            penalty.add_gradient_(got_g, w, 0.3)
            penalty.decay_(got_w, 0.05, 0.3)
            results.append((got_g, got_w))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    assert len(kernels) == 4


def test_a_weight_written_by_a_kernel_is_seen_as_changed_by_autograd(kernels):
    w = torch.nn.Parameter(torch.randn(5, 7))
    loss = (w * w).sum()  # saves w for backward
    with torch.no_grad():
        L1(0.1).decay_(w, 0.1, 0.1)
    assert kernels == ["l1_decay"]
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
