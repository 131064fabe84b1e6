"""The fused preconditioned prox against its eager reference (``Penalty.prox_`` with the bounded step ``t``).

The fast tests run the kernels' formula uncompiled and the switching rule with a stand-in for the compiler; the
slow one compiles the kernels (seconds each) and compares them with the eager reference on small tensors.
"""

import pytest
import torch
from sklearn.datasets import load_diabetes
from sklearn.linear_model import ElasticNet as SkElasticNet
from sklearn.linear_model import Lasso

from lightreg import L0, L1, L2, ElasticNet, GroupLasso, Regularizer
import lightreg.proximal.fused_prox as fused_prox
from lightreg.proximal.adaptive_step import AdaptiveStep
from lightreg.proximal.fused_prox import apply_prox, fused_reference
from lightreg.proximal.metric import LazySteps, metric_rule, step_rule
from tests.test_adaptive_prox import assert_reaches, fit_full_batch, sklearn_optimum

PENALTIES = [L1(0.3), L2(0.3), ElasticNet(0.3, 0.5), ElasticNet(0.3, 0.0), L0(0.3)]


def _adam_after_steps(dtype, n=3, size=(6, 5), seed=0, dead=True):
    """An Adam whose state has unstepped coordinates (a column whose gradient is always 0) and steps spread widely."""
    g = torch.Generator().manual_seed(seed)
    p = torch.nn.Parameter(torch.randn(*size, generator=g, dtype=dtype))
    opt = torch.optim.Adam([p], lr=0.1)
    for _ in range(n):
        n_el = p.numel()
        grad = torch.randn(n_el, generator=g, dtype=dtype) * torch.logspace(-3, 0, n_el, dtype=dtype)
        if dead:
            grad[2::5] = 0.0  # never stepped: v = 0 there
        p.grad = grad.view(size)
        opt.step()
    return p, opt


@pytest.mark.parametrize("dead", [True, False], ids=["unstepped", "all_stepped"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("penalty", PENALTIES, ids=repr)
def test_the_fused_formula_equals_the_eager_reference(penalty, dtype, dead):
    p, opt = _adam_after_steps(dtype, dead=dead)
    step = metric_rule(opt, opt.param_groups[0])(p)
    assert isinstance(step, AdaptiveStep) and (step.second_moment == 0).any() == dead
    eager, fused = p.detach().clone(), p.detach().clone()
    penalty.prox_(eager, step.bounded(), penalty.alpha)
    fused_reference(penalty, fused, step, penalty.alpha)
    tol = dict(rtol=1e-6, atol=1e-7) if dtype == torch.float32 else dict(rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(fused, eager, **tol)
    assert torch.equal(fused == 0, eager == 0)


def _lazy(opt, params):
    group = opt.param_groups[0]
    return LazySteps(step_rule(opt, group), params, metric_rule(opt, group))


@pytest.mark.parametrize("penalty", PENALTIES + [GroupLasso(0.3)], ids=repr)
def test_below_the_threshold_apply_prox_is_the_eager_reference_bit_for_bit(penalty, monkeypatch):
    monkeypatch.setitem(fused_prox._state, "eager_elements", 0)
    p, opt = _adam_after_steps(torch.float32)
    expected = p.detach().clone()
    penalty.apply_prox_([expected], [step_rule(opt, opt.param_groups[0])(p)], 0.3)
    w = p.detach()
    apply_prox(penalty, [w], _lazy(opt, [p]), 0.3)
    assert torch.equal(w, expected)


def test_the_kernels_take_over_once_the_eager_steps_have_paid_for_compiling(monkeypatch):
    calls = []
    monkeypatch.setattr(fused_prox, "COMPILE_AFTER_ELEMENTS", 60)  # two steps of a 30-element tensor
    monkeypatch.setitem(fused_prox._state, "eager_elements", 0)
    monkeypatch.setattr(fused_prox, "kernel", lambda name: lambda *a: calls.append(name) or fused_prox.EAGER[name](*a))
    p, opt = _adam_after_steps(torch.float64)
    for k in range(4):
        apply_prox(L1(0.01), [p.detach()], _lazy(opt, [p]), 0.01)
        assert len(calls) == max(k - 1, 0)
    assert calls == ["l1", "l1"]


def test_a_compiler_that_fails_is_reported_once_and_the_eager_step_continues(monkeypatch):
    monkeypatch.setattr(fused_prox, "COMPILE_AFTER_ELEMENTS", 0)
    monkeypatch.setitem(fused_prox._state, "failed", False)

    def broken(name):
        def run(*args):
            raise RuntimeError("no C++ compiler")
        return run

    monkeypatch.setattr(fused_prox, "kernel", broken)
    p, opt = _adam_after_steps(torch.float64)
    expected = p.detach().clone()
    L1(0.3).apply_prox_([expected], [step_rule(opt, opt.param_groups[0])(p)], 0.3)
    with pytest.warns(UserWarning, match="compiling the fused prox kernel failed"):
        apply_prox(L1(0.3), [p.detach()], _lazy(opt, [p]), 0.3)
    assert torch.equal(p.detach(), expected) and fused_prox._state["failed"]


def test_a_v_that_turns_zero_between_checks_is_kept_until_the_recheck_then_takes_the_typical_step(monkeypatch):
    """On the CPU a v found free of zeros is read again every RECHECK_EVERY steps; a coordinate whose v became 0 in
    between is kept as it is (not wiped by lr / eps), and takes the reference's typical step after the recheck."""
    monkeypatch.setattr(fused_prox, "RECHECK_EVERY", 3)
    p, opt = _adam_after_steps(torch.float64, dead=False)
    rule = metric_rule(opt, opt.param_groups[0])
    w = p.detach()
    i = divmod(int(w.abs().argmax()), w.shape[1])  # a weight the prox moves but does not zero
    fused_reference(L1(1e-3), w, rule(p), 1e-3)  # every v > 0: read and remembered
    opt.state[p]["exp_avg_sq"][i] = 0.0  # a user rewrites the state in place
    for k in range(4):
        before = w.clone()
        step = rule(p)
        expected = before.clone()
        L1(1e-3).prox_(expected, step.bounded(), 1e-3)  # the reference: v̄'s step at i
        fused_reference(L1(1e-3), w, step, 1e-3)
        if k < 2:  # remembered: i kept, the rest as the reference
            assert w[i] == before[i] and expected[i] != before[i]
            expected[i] = before[i]
        torch.testing.assert_close(w, expected, rtol=1e-14, atol=1e-15)


@pytest.mark.slow
@pytest.mark.parametrize("penalty", [L1(0.3), ElasticNet(0.3, 0.5), L2(0.3), L0(0.3)], ids=repr)
@pytest.mark.parametrize("dead", [True, False], ids=["unstepped", "all_stepped"])
def test_the_compiled_kernel_equals_the_eager_reference(penalty, dead):
    """torch.compile (inductor): to rounding, any shape (dynamic), any lr (no recompilation per value)."""
    for size, lr in (((6, 5), 0.1), ((7, 3, 2), 0.02)):
        p, opt = _adam_after_steps(torch.float32, size=size, dead=dead)
        opt.param_groups[0]["lr"] = lr
        step = metric_rule(opt, opt.param_groups[0])(p)
        eager, fused = p.detach().clone(), p.detach().clone()
        penalty.prox_(eager, step.bounded(), penalty.alpha)
        name, a, b = fused_prox._coefficients(penalty, penalty.alpha)
        fused_prox.fused_prox_(fused_prox.kernel(name), fused, step, a, b)
        torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-6)
        assert torch.equal(fused == 0, eager == 0)


@pytest.mark.slow
@pytest.mark.parametrize("penalty, sk", [(L1(0.05), Lasso(alpha=0.05)),
                                         (ElasticNet(0.05, l1_ratio=0.5), SkElasticNet(alpha=0.05, l1_ratio=0.5))],
                         ids=["lasso", "elastic_net"])
def test_adam_through_the_compiled_kernel_reaches_scikit_learn(monkeypatch, penalty, sk):
    """A whole fit through the compiled kernels (from the first step) ends at scikit-learn's optimum, zeros included."""
    used = []
    monkeypatch.setattr(fused_prox, "COMPILE_AFTER_ELEMENTS", 0)
    compiled = fused_prox.kernel
    monkeypatch.setattr(fused_prox, "kernel", lambda name: used.append(name) or compiled(name))
    x, y = load_diabetes(return_X_y=True)
    x, y = (x - x.mean(0)) / x.std(0), (y - y.mean()) / y.std()
    assert_reaches(fit_full_batch(x, y, Regularizer(penalty)), sklearn_optimum(sk, x, y))
    assert len(used) == 700
