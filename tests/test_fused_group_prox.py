"""GroupLasso's fused preconditioned prox (``lightreg.proximal.fused_group_prox``) against its eager reference.

Oracles: the eager ``GroupLasso._metric_prox_`` on the bounded step (to rounding: the kernel iterates Newton's
method to convergence instead of a fixed count), and, independently of both, the optimality conditions of
``argmin_x alpha*sqrt(|g|)*||x_g|| + Σ_i (x_i - u_i)² / (2 t_i)`` written out per group, with ``t`` computed here
from Adam's formula (``lr / (sqrt(v / (1 - beta2^k)) + eps)``, ``v`` floored at its stepped mean where it is 0).
The kernel compiles in about a second, once per process (then cached on disk).
"""

import math
import warnings

import pytest
import torch

from lightreg import GroupLasso
import lightreg.proximal.fused_group_prox as fused_group_prox
import lightreg.proximal.group_prox_kernel as group_prox_kernel
import lightreg.base.c_kernels as c_kernels
from lightreg.proximal.adaptive_step import AdaptiveStep
from lightreg.proximal.fused_prox import apply_prox
from lightreg.proximal.metric import LazySteps, metric_rule, step_rule

CASES = [((12, 10), 0), ((12, 10), 1), ((5, 3, 2, 2), 1), ((9,), 0), ((4, 3, 5), -1)]


def _adam(shape, dtype, dead="column", steps=3, seed=0, lr=0.1):
    """A parameter and the Adam that stepped it: steps spread over 4 decades, some coordinates never stepped."""
    g = torch.Generator().manual_seed(seed)
    p = torch.nn.Parameter(torch.randn(shape, generator=g, dtype=dtype) * 0.3)
    opt = torch.optim.Adam([p], lr=lr)
    for _ in range(steps):
        grad = torch.randn(shape, generator=g, dtype=dtype) * torch.logspace(-3, 1, p.numel(), dtype=dtype).view(shape)
        if dead == "column":
            grad.view(-1)[1::4] = 0.0  # v = 0 there: the typical step
        elif dead == "all":
            grad.zero_()  # no coordinate stepped: the plain lr
        p.grad = grad
        opt.step()
    return p, opt


def _alpha(p, step, dim):
    """An alpha between the middle zero levels, so about half of the groups die and none sits on the boundary."""
    levels = GroupLasso(1.0, dim=dim).zero_levels(p.detach(), step).sort().values
    n = len(levels)
    return float(levels[max(n // 2 - 1, 0) : n // 2 + 1].mean()) if n > 1 else float(levels[0]) / 2


def _both(p, opt, dim, alpha):
    """(the eager reference, the kernel through apply_prox) of one prox step."""
    group = opt.param_groups[0]
    penalty = GroupLasso(alpha, dim=dim)
    reference = p.detach().clone()
    penalty.prox_(reference, step_rule(opt, group)(p), alpha)
    out = p.detach().clone()
    apply_prox(penalty, [out], LazySteps(step_rule(opt, group), [p], metric_rule(opt, group)), alpha)
    return reference, out


@pytest.fixture
def compiled(monkeypatch):
    """The kernel from the first step on, and a record of the tensors it handled."""
    calls = []
    kernel = fused_group_prox.fused_group_prox_
    monkeypatch.setattr(fused_group_prox, "BUILD_AFTER_ELEMENTS", 0)
    monkeypatch.setitem(fused_group_prox._state, "failed", False)
    monkeypatch.setattr(fused_group_prox, "fused_group_prox_", lambda *a: calls.append(a[1].shape) or kernel(*a))
    return calls


@pytest.mark.parametrize("dead", ["column", "none", "all"])
@pytest.mark.parametrize("shape,dim", CASES)
def test_the_kernel_equals_the_eager_reference_in_float64(shape, dim, dead, compiled):
    p, opt = _adam(shape, torch.float64, dead=dead)
    alpha = _alpha(p, step_rule(opt, opt.param_groups[0])(p), dim)
    reference, out = _both(p, opt, dim, alpha)
    assert compiled == [p.shape]
    torch.testing.assert_close(out, reference, rtol=1e-12, atol=1e-15)
    assert torch.equal(out == 0, reference == 0)  # the same groups die
    assert 0 < (reference == 0).sum() < reference.numel() or reference.numel() < 10


@pytest.mark.parametrize("shape,dim", CASES[:3])
def test_the_kernel_equals_the_eager_reference_in_float32(shape, dim, compiled):
    p, opt = _adam(shape, torch.float32)
    alpha = _alpha(p, step_rule(opt, opt.param_groups[0])(p), dim)
    reference, out = _both(p, opt, dim, alpha)
    torch.testing.assert_close(out, reference, rtol=2e-5, atol=1e-7)


def _adam_step_by_hand(p, opt):
    """Adam's per-coordinate step from its formula, v floored at the mean of its positive entries where it is 0."""
    state, group = opt.state[p], opt.param_groups[0]
    beta2, eps, lr = group["betas"][1], group["eps"], group["lr"]
    v = state["exp_avg_sq"].double()
    positive = v[v > 0]
    floored = torch.where(v > 0, v, positive.mean() if positive.numel() else torch.zeros((), dtype=v.dtype))
    t = lr / (floored.sqrt() / math.sqrt(1 - beta2 ** float(state["step"])) + eps)
    return torch.where(floored > 0, t, torch.full_like(t, lr))


@pytest.mark.parametrize("dead", ["column", "all"])
@pytest.mark.parametrize("shape,dim", CASES)
def test_the_kernel_solves_the_prox_problem_written_out(shape, dim, dead, compiled):
    p, opt = _adam(shape, torch.float64, dead=dead, seed=2)
    t = _adam_step_by_hand(p, opt)
    alpha = _alpha(p, t, dim)
    out = p.detach().clone()
    penalty = GroupLasso(alpha, dim=dim)
    group = opt.param_groups[0]
    apply_prox(penalty, [out], LazySteps(step_rule(opt, group), [p], metric_rule(opt, group)), alpha)
    lam = alpha * math.sqrt(p.numel() / p.shape[dim])
    d = dim % p.ndim
    for i in range(p.shape[d]):
        u, tg, x = p.detach().select(d, i), t.select(d, i), out.select(d, i)
        if torch.all(x == 0):  # zero iff the subgradient condition holds at 0: ||u / t|| <= lam
            assert torch.linalg.vector_norm(u / tg) <= lam * (1 + 1e-12)
        else:  # (x - u) / t + lam * x / ||x|| = 0
            residual = (x - u) / tg + lam * x / torch.linalg.vector_norm(x)
            assert torch.linalg.vector_norm(residual) <= 1e-10 * torch.linalg.vector_norm(u / tg)


def test_the_threads_split_the_groups_without_changing_a_bit(monkeypatch, compiled):
    p, opt = _adam((64, 8), torch.float32)
    alpha = _alpha(p, step_rule(opt, opt.param_groups[0])(p), 0)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        _, one = _both(p, opt, 0, alpha)
        monkeypatch.setattr(c_kernels, "PARALLEL_ELEMENTS", 16)
        torch.set_num_threads(3)  # three ranges, the one that meets the unstepped column first resumes with v̄
        _, three = _both(p, opt, 0, alpha)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, three)


def test_below_the_threshold_the_eager_reference_runs_bit_for_bit(monkeypatch):
    monkeypatch.setattr(fused_group_prox, "BUILD_AFTER_ELEMENTS", 100)  # two steps of a 60-element tensor
    monkeypatch.setitem(fused_group_prox._state, "eager_elements", 0)
    monkeypatch.setitem(fused_group_prox._state, "failed", False)
    calls = []
    monkeypatch.setattr(fused_group_prox, "fused_group_prox_", lambda *a: calls.append(1))
    p, opt = _adam((6, 10), torch.float32)
    for expected in (0, 0, 1):
        reference, out = _both(p, opt, 0, 0.05)
        assert len(calls) == expected
        if not calls:
            assert torch.equal(out, reference)


def test_what_the_kernel_does_not_take_runs_the_reference(compiled):
    """A float step (SGD), 16-bit weights, a non-contiguous view, with_bias: the eager reference, bit for bit."""
    p, opt = _adam((6, 4), torch.float32)
    group = opt.param_groups[0]
    sgd = torch.optim.SGD([p], lr=0.1)
    for penalty, tensor, steps in [
        (GroupLasso(0.05), p.detach().clone(), LazySteps(step_rule(sgd, sgd.param_groups[0]), [p], metric_rule(sgd, sgd.param_groups[0]))),
        (GroupLasso(0.05, dim=1), p.detach().clone().t().contiguous().t(), LazySteps(step_rule(opt, group), [p], metric_rule(opt, group))),
    ]:
        expected = tensor.clone()
        penalty.apply_prox_([expected], steps, 0.05)
        apply_prox(penalty, [tensor], steps, 0.05)
        assert torch.equal(tensor, expected)
    half = p.detach().clone().to(torch.bfloat16)
    step = AdaptiveStep(0.1, torch.rand(6, 4).to(torch.bfloat16), 1.0, 1e-8, 0.1)
    assert not fused_group_prox._fusable(half, step)
    assert not fused_group_prox.applies(GroupLasso(0.05, with_bias=True), LazySteps(step_rule(opt, group), [p], metric_rule(opt, group)))
    assert compiled == []


def test_a_zero_learning_rate_leaves_every_weight_alone(compiled):
    p, opt = _adam((6, 4), torch.float32)
    opt.param_groups[0]["lr"] = 0.0
    group = opt.param_groups[0]
    out = p.detach().clone()
    apply_prox(GroupLasso(10.0), [out], LazySteps(step_rule(opt, group), [p], metric_rule(opt, group)), 10.0)
    assert torch.equal(out, p.detach())


def test_a_missing_compiler_is_reported_once_and_the_eager_step_continues(monkeypatch):
    monkeypatch.setattr(fused_group_prox, "BUILD_AFTER_ELEMENTS", 0)
    monkeypatch.setitem(fused_group_prox._state, "failed", False)
    monkeypatch.setattr(group_prox_kernel, "_library", {})
    monkeypatch.setenv("CC", "no-such-compiler-lightreg")
    p, opt = _adam((6, 4), torch.float32)
    with pytest.warns(UserWarning, match="fused group-lasso prox kernel failed") as record:
        reference, out = _both(p, opt, 0, 0.05)
    assert len([w for w in record if "group-lasso" in str(w.message)]) == 1
    assert torch.equal(out, reference)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reference, out = _both(p, opt, 0, 0.05)  # no second warning
    assert torch.equal(out, reference)


@pytest.mark.parametrize("dim", [0, 1])
def test_a_group_met_late_with_an_unstepped_coordinate_resumes_with_the_typical_step(dim):
    """v > 0 everywhere but in one entry of a middle group: the kernel stops there, takes v̄, and carries on."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(10, 8, generator=g, dtype=torch.float64) * 0.3
    v = torch.rand(10, 8, generator=g, dtype=torch.float64) * torch.logspace(-4, 0, 8, dtype=torch.float64)
    v[7, 5] = 0.0
    step = AdaptiveStep(0.1, v, 0.5, 1e-8, 0.1)
    alpha = _alpha(w, step.bounded(), dim)
    reference = w.clone()
    GroupLasso(alpha, dim=dim).prox_(reference, step.bounded(), alpha)
    asked = []
    out = w.clone()
    group_prox_kernel.group_prox_(out, v, dim, lambda: asked.append(1) or float(step.typical()), 0.1, 0.5, 1e-8, 0.1,
                                  alpha * math.sqrt(w.numel() / w.shape[dim]))
    assert asked == [1]
    torch.testing.assert_close(out, reference, rtol=1e-12, atol=1e-15)
