"""The fused preconditioned prox against its eager reference (``Penalty.prox_`` with the bounded step ``t``).

The C kernels (the CPU backend, built in about a second) against the reference, the switching rule, a failing
compiler, and a whole fit against scikit-learn; the torch formula (what an accelerator compiles) uncompiled, and, in
the slow test, compiled by inductor on the CPU.
"""

import pytest
import torch
from sklearn.datasets import load_diabetes
from sklearn.linear_model import ElasticNet as SkElasticNet
from sklearn.linear_model import Lasso

from lightreg import L0, L1, L2, ElasticNet, GroupLasso, Regularizer
import lightreg.base.c_kernels as c_kernels
import lightreg.proximal.fused_prox as fused_prox
from lightreg.proximal import elementwise_kernel
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


@pytest.mark.parametrize("penalty", PENALTIES, ids=repr)  # GroupLasso: tests/test_fused_group_prox.py (own kernel)
def test_below_the_threshold_apply_prox_is_the_eager_reference_bit_for_bit(penalty, monkeypatch):
    monkeypatch.setattr(fused_prox, "BUILD_AFTER_ELEMENTS", 1e6)
    monkeypatch.setitem(fused_prox._state, "eager_elements", 0)
    p, opt = _adam_after_steps(torch.float32)
    expected = p.detach().clone()
    penalty.apply_prox_([expected], [step_rule(opt, opt.param_groups[0])(p)], 0.3)
    w = p.detach()
    apply_prox(penalty, [w], _lazy(opt, [p]), 0.3)
    assert torch.equal(w, expected)


def test_the_c_kernels_take_over_once_the_eager_steps_have_paid_for_building(monkeypatch):
    calls = []
    monkeypatch.setattr(fused_prox, "BUILD_AFTER_ELEMENTS", 60)  # two steps of a 30-element tensor
    monkeypatch.setitem(fused_prox._state, "eager_elements", 0)
    run = elementwise_kernel.elementwise_prox_
    monkeypatch.setattr(elementwise_kernel, "elementwise_prox_", lambda name, *a: calls.append(name) or run(name, *a))
    p, opt = _adam_after_steps(torch.float64)
    for k in range(4):
        apply_prox(L1(0.01), [p.detach()], _lazy(opt, [p]), 0.01)
        assert len(calls) == max(k - 1, 0)
    assert calls == ["l1", "l1"]


def test_a_compiler_that_fails_is_reported_once_and_the_eager_step_continues(monkeypatch):
    monkeypatch.setattr(fused_prox, "BUILD_AFTER_ELEMENTS", 0)
    monkeypatch.setitem(fused_prox._state, "failed", False)
    monkeypatch.setenv("CC", "no-such-compiler")
    monkeypatch.setattr(elementwise_kernel, "_library", {})  # not loaded in this process yet
    p, opt = _adam_after_steps(torch.float64)
    expected = p.detach().clone()
    L1(0.3).apply_prox_([expected], [step_rule(opt, opt.param_groups[0])(p)], 0.3)
    with pytest.warns(UserWarning, match="building the fused prox kernel failed .*no-such-compiler"):
        apply_prox(L1(0.3), [p.detach()], _lazy(opt, [p]), 0.3)
    assert torch.equal(p.detach(), expected) and fused_prox._state["failed"]


@pytest.mark.parametrize("dead", [True, False], ids=["unstepped", "all_stepped"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("penalty", PENALTIES, ids=repr)
def test_the_c_kernel_equals_the_eager_reference(penalty, dtype, dead, monkeypatch):
    """To rounding, zeros exactly where the reference has them; a tensor split over threads gives the same bits."""
    p, opt = _adam_after_steps(dtype, size=(40, 25), dead=dead)
    step = metric_rule(opt, opt.param_groups[0])(p)
    eager, fused, split = p.detach().clone(), p.detach().clone(), p.detach().clone()
    penalty.prox_(eager, step.bounded(), penalty.alpha)
    name, a, b = fused_prox._coefficients(penalty, penalty.alpha)
    elementwise_kernel.elementwise_prox_(name, fused, step, a, b)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-13, atol=1e-14)  # |w| <= 3
    torch.testing.assert_close(fused, eager, **tol)
    assert torch.equal(fused == 0, eager == 0)
    monkeypatch.setattr(c_kernels, "PARALLEL_ELEMENTS", 64)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    elementwise_kernel.elementwise_prox_(name, split, step, a, b)
    assert torch.equal(split, fused)


@pytest.mark.parametrize("penalty", PENALTIES, ids=repr)
def test_non_finite_weights_come_out_as_the_eager_step_leaves_them(penalty):
    """A NaN weight stays NaN (divergence stays visible), an infinite one stays infinite, in the C kernel and in the
    torch formula (an accelerator's kernel), as in the eager step."""
    p, opt = _adam_after_steps(torch.float32, size=(6, 5))
    with torch.no_grad():
        p.view(-1)[:4] = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0])
    step = metric_rule(opt, opt.param_groups[0])(p)
    eager, fused, formula = p.detach().clone(), p.detach().clone(), p.detach().clone()
    penalty.prox_(eager, step.bounded(), penalty.alpha)
    name, a, b = fused_prox._coefficients(penalty, penalty.alpha)
    elementwise_kernel.elementwise_prox_(name, fused, step, a, b)
    fused_reference(penalty, formula, step, penalty.alpha)
    assert eager.view(-1)[0].isnan() and not eager.view(-1)[1:3].isnan().any()
    for out in (fused, formula):
        torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-6, equal_nan=True)


def test_the_c_kernel_gives_an_unstepped_coordinate_the_typical_step_and_leaves_the_rest_to_the_optimizers():
    """v = 0 on one coordinate: that coordinate takes t = c / (sqrt(v̄) / d + eps), v̄ the mean of the positive v
    (computed here by hand); every other coordinate takes its own t; nothing stepped at all: the plain fallback."""
    v = torch.tensor([0.0, 1e-4, 4e-4, 9e-4], dtype=torch.float64)
    w = torch.tensor([0.5, 0.5, -0.5, 0.5], dtype=torch.float64)
    c, d, eps = 0.01, 0.5, 1e-8
    t = c / (v.sqrt() / d + eps)
    t[0] = c / ((14e-4 / 3) ** 0.5 / d + eps)
    out = w.clone()
    elementwise_kernel.elementwise_prox_("l1", out, AdaptiveStep(c, v, d, eps, 0.02), 1.0, 0.0)
    torch.testing.assert_close(out, w - t * w.sign(), rtol=1e-13, atol=0)
    out = w.clone()
    elementwise_kernel.elementwise_prox_("l1", out, AdaptiveStep(c, torch.zeros(4, dtype=torch.float64), d, eps, 0.02),
                                         1.0, 0.0)
    torch.testing.assert_close(out, w - 0.02 * w.sign(), rtol=1e-13, atol=0)


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
        fused_prox.fused_prox_(fused_prox.kernel(name), fused, step, a, b)  # what an accelerator runs
        torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-6)
        assert torch.equal(fused == 0, eager == 0)


@pytest.mark.parametrize("penalty, sk", [(L1(0.05), Lasso(alpha=0.05)),
                                         (ElasticNet(0.05, l1_ratio=0.5), SkElasticNet(alpha=0.05, l1_ratio=0.5))],
                         ids=["lasso", "elastic_net"])
def test_adam_through_the_c_kernel_reaches_scikit_learn(monkeypatch, penalty, sk):
    """A whole fit through the C kernels (from the first step) ends at scikit-learn's optimum, zeros included."""
    used = []
    monkeypatch.setattr(fused_prox, "BUILD_AFTER_ELEMENTS", 0)
    run = elementwise_kernel.elementwise_prox_
    monkeypatch.setattr(elementwise_kernel, "elementwise_prox_", lambda name, *a: used.append(name) or run(name, *a))
    x, y = load_diabetes(return_X_y=True)
    x, y = (x - x.mean(0)) / x.std(0), (y - y.mean()) / y.std()
    assert_reaches(fit_full_batch(x, y, Regularizer(penalty)), sklearn_optimum(sk, x, y))
    assert len(used) == 700


def test_a_kernel_cache_that_others_can_write_is_refused_before_anything_is_loaded(tmp_path, monkeypatch):
    """A library loaded from the cache runs as the user: a folder others can write is refused (the eager step stays)."""
    folder = tmp_path / "kernels"
    folder.mkdir()
    folder.chmod(0o777)
    monkeypatch.setenv("LIGHTREG_KERNEL_CACHE", str(folder))
    with pytest.raises(c_kernels.CompileError, match="not private"):
        c_kernels.load("private_check", "int one(void) { return 1; }")
    assert list(folder.iterdir()) == []
    folder.chmod(0o700)
    assert c_kernels.load("private_check", "int one(void) { return 1; }").one() == 1


@pytest.mark.parametrize("where", ["a_file", "unwritable"])
def test_a_kernel_cache_that_cannot_be_made_is_a_compile_error_not_a_crash(tmp_path, monkeypatch, where):
    """LIGHTREG_KERNEL_CACHE on a file, or under one: CompileError (the callers warn once and keep the eager step)."""
    (tmp_path / "f").write_text("")
    monkeypatch.setenv("LIGHTREG_KERNEL_CACHE", str(tmp_path / "f" if where == "a_file" else tmp_path / "f" / "k"))
    with pytest.raises(c_kernels.CompileError, match="cannot use the kernel cache"):
        c_kernels.load("cache_check", "int one(void) { return 1; }")


def test_an_unusable_default_cache_falls_back_to_a_private_temporary_folder(tmp_path, monkeypatch):
    """A read-only or missing home (a container run as another user): the per-user folder in the temp directory."""
    monkeypatch.delenv("LIGHTREG_KERNEL_CACHE", raising=False)
    (tmp_path / "home").write_text("")  # $XDG_CACHE_HOME/lightreg cannot be made under a file
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(c_kernels, "_fallback_folder", lambda: tmp_path / "tmp-kernels")
    assert c_kernels.load("fallback_check", "int two(void) { return 2; }").two() == 2
    assert [p.name.split("_")[0] for p in (tmp_path / "tmp-kernels").iterdir()] == ["fallback"]


def test_the_cache_key_names_the_cpu_a_library_was_built_for(monkeypatch):
    """Built with -march=native: a library from another CPU (a home shared between machines) is not loaded."""
    here = c_kernels.library_path("x", "int f(void) { return 0; }")
    monkeypatch.setattr(c_kernels, "machine", lambda: "another cpu")
    assert c_kernels.library_path("x", "int f(void) { return 0; }") != here


def test_the_c_kernel_tells_autograd_that_the_weight_changed():
    """Written through a pointer, the weight's version counter still moves: a graph that saved it refuses backward."""
    p, opt = _adam_after_steps(torch.float64)
    w = p.detach()
    saved = (p * p).sum()  # saves p for the backward pass
    before = w._version
    elementwise_kernel.elementwise_prox_("l1", w, metric_rule(opt, opt.param_groups[0])(p), 0.01, 0.0)
    assert w._version > before
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        saved.backward()
