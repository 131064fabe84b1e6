"""The fused preconditioned prox against its eager reference (``Penalty.prox_`` with the bounded step ``t``).

The fast tests run the kernels' formula uncompiled and the switching rule with a stand-in for the compiler; the
slow one compiles the kernels (seconds each) and compares them with the eager reference on small tensors.
"""

import pytest
import torch

from lightreg import L0, L1, L2, ElasticNet, GroupLasso
import lightreg.proximal.fused_prox as fused_prox
from lightreg.proximal.adaptive_step import AdaptiveStep
from lightreg.proximal.fused_prox import apply_prox, fused_reference
from lightreg.proximal.metric import LazySteps, metric_rule, step_rule

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


@pytest.mark.parametrize("penalty", PENALTIES, ids=repr)  # GroupLasso: tests/test_fused_group_prox.py (own kernel)
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


@pytest.mark.slow
@pytest.mark.parametrize("penalty", [L1(0.3), ElasticNet(0.3, 0.5), L2(0.3), L0(0.3)], ids=repr)
def test_the_compiled_kernel_equals_the_eager_reference(penalty):
    """torch.compile (inductor): to rounding, any shape (dynamic), any lr (no recompilation per value)."""
    for size, lr in (((6, 5), 0.1), ((7, 3, 2), 0.02)):
        p, opt = _adam_after_steps(torch.float32, size=size)
        opt.param_groups[0]["lr"] = lr
        step = metric_rule(opt, opt.param_groups[0])(p)
        eager, fused = p.detach().clone(), p.detach().clone()
        penalty.prox_(eager, step.bounded(), penalty.alpha)
        name, a, b = fused_prox._coefficients(penalty, penalty.alpha)
        fused_prox.kernel(name)(fused.view(-1), step.second_moment.view(-1), step.typical(), step.numerator,
                                step.divisor, step.eps, step.fallback, a, b)
        torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-6)
