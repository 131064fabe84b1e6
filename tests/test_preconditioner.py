"""The per-coordinate step of each optimizer, against its algorithm written out from torch's documentation.

Each case takes real optimizer steps on a tiny float64 parameter with known gradients, runs the
documented recursions by hand alongside (moments, bias corrections, running max, momentum buffer), and
checks (a) ``step_rule`` against the hand-written ``t`` and (b) that the optimizer really moved the
parameter by ``t`` times its documented direction, so the oracle is the optimizer's own step.
"""

import math

import pytest
import torch

import lightreg.proximal.optimizer_steps as optimizer_steps
from lightreg.proximal.metric import (LazySteps, is_preconditioned, metric_rule, scalar_step, step_formula, step_rule,
                                      unknown_adaptive_state)


@pytest.fixture(autouse=True)
def _float64(float64):
    """Exact comparisons (optimizer scalars such as ``step`` take the default dtype too)."""


STEPS = 8  # RAdam's rho_t passes 5 at step 6 with beta2 = 0.999: both branches are covered
LR = 0.01


def _grads(n=STEPS, size=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Gradients spanning orders of magnitude, so t differs strongly across coordinates.
    return [torch.randn(size, generator=g, dtype=torch.float64) * torch.logspace(-3, 1, size, dtype=torch.float64)
            for _ in range(n)]


def cap(v):
    """The bound of the per-coordinate step: where v = 0 (never stepped), the mean v of the stepped coordinates."""
    v = torch.as_tensor(v)
    return torch.where(v > 0, v, v[v > 0].mean()) if (v > 0).any() else v


class Adam:
    """torch.optim.Adam's documented algorithm (coupled weight_decay, decoupled for AdamW, amsgrad)."""

    def __init__(self, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False, decoupled=False, **_):
        self.lr, (self.b1, self.b2), self.eps, self.wd, self.amsgrad = lr, betas, eps, weight_decay, amsgrad
        self.decoupled, self.m, self.v, self.vmax, self.k = decoupled, 0.0, 0.0, 0.0, 0

    def update(self, theta, g):
        self.k += 1
        if self.wd and not self.decoupled:
            g = g + self.wd * theta
        self.m = self.b1 * self.m + (1 - self.b1) * g
        self.v = self.b2 * self.v + (1 - self.b2) * g * g
        self.vmax = torch.maximum(torch.as_tensor(self.vmax), self.v)
        v_hat = (self.vmax if self.amsgrad else self.v) / (1 - self.b2**self.k)
        t = self.lr / (v_hat.sqrt() + self.eps)
        shrink = 1 - self.lr * self.wd if self.decoupled else 1.0
        return t, self.lr / (cap(v_hat).sqrt() + self.eps), theta * shrink - t * self.m / (1 - self.b1**self.k)


class NAdam(Adam):
    def __init__(self, lr, momentum_decay=4e-3, **kw):
        super().__init__(lr, **kw)
        self.psi, self.mu_product = momentum_decay, 1.0

    def update(self, theta, g):
        self.k += 1
        mu = self.b1 * (1 - 0.5 * 0.96 ** (self.k * self.psi))
        mu_next = self.b1 * (1 - 0.5 * 0.96 ** ((self.k + 1) * self.psi))
        self.mu_product *= mu
        self.m = self.b1 * self.m + (1 - self.b1) * g
        self.v = self.b2 * self.v + (1 - self.b2) * g * g
        c1, c2 = (1 - mu) / (1 - self.mu_product), mu_next / (1 - self.mu_product * mu_next)
        v_hat = self.v / (1 - self.b2**self.k)
        denom = v_hat.sqrt() + self.eps
        # t is the step on a constant gradient g, where both terms move along g: lr * (c1 + c2) / denom.
        return (self.lr * (c1 + c2) / denom, self.lr * (c1 + c2) / (cap(v_hat).sqrt() + self.eps),
                theta - self.lr * (c1 * g + c2 * self.m) / denom)


class RAdam(Adam):
    def update(self, theta, g):
        self.k += 1
        self.m = self.b1 * self.m + (1 - self.b1) * g
        self.v = self.b2 * self.v + (1 - self.b2) * g * g
        m_hat = self.m / (1 - self.b1**self.k)
        rho_inf = 2 / (1 - self.b2) - 1
        rho = rho_inf - 2 * self.k * self.b2**self.k / (1 - self.b2**self.k)
        if rho > 5:
            rect = math.sqrt((rho - 4) * (rho - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho))
            t = self.lr * rect * math.sqrt(1 - self.b2**self.k) / (self.v.sqrt() + self.eps)
            bounded = self.lr * rect * math.sqrt(1 - self.b2**self.k) / (cap(self.v).sqrt() + self.eps)
        else:
            t = bounded = torch.full_like(g, self.lr)
        return t, bounded, theta - t * m_hat


class RMSprop:
    def __init__(self, lr, alpha=0.99, eps=1e-8, momentum=0.0, centered=False, **_):
        self.lr, self.alpha, self.eps, self.mu, self.centered = lr, alpha, eps, momentum, centered
        self.v, self.ga, self.buf = 0.0, 0.0, 0.0

    def update(self, theta, g):
        self.v = self.alpha * self.v + (1 - self.alpha) * g * g
        self.ga = self.alpha * self.ga + (1 - self.alpha) * g
        square = (self.v - self.ga**2) if self.centered else self.v
        avg = square.sqrt() + self.eps
        self.buf = self.mu * self.buf + g / avg
        bounded = self.lr / (1 - self.mu) / (cap(square).sqrt() + self.eps)
        return self.lr / (avg * (1 - self.mu)), bounded, theta - self.lr * self.buf


class Adagrad:
    def __init__(self, lr, lr_decay=0.0, eps=1e-10, **_):
        self.lr, self.lr_decay, self.eps, self.sum, self.k = lr, lr_decay, eps, 0.0, 0

    def update(self, theta, g):
        self.k += 1
        self.sum = self.sum + g * g
        t = self.lr / (1 + (self.k - 1) * self.lr_decay) / (self.sum.sqrt() + self.eps)
        return t, self.lr / (1 + (self.k - 1) * self.lr_decay) / (cap(self.sum).sqrt() + self.eps), theta - t * g


CASES = [
    (torch.optim.Adam, {}, Adam),
    (torch.optim.Adam, {"amsgrad": True}, Adam),
    (torch.optim.Adam, {"weight_decay": 0.1}, Adam),
    (torch.optim.Adam, {"foreach": True, "betas": (0.8, 0.99), "eps": 1e-3}, Adam),
    (torch.optim.Adam, {"foreach": False}, Adam),
    (torch.optim.Adam, {"fused": True}, Adam),
    (torch.optim.AdamW, {"weight_decay": 0.1, "decoupled": True}, Adam),
    (torch.optim.AdamW, {"amsgrad": True, "foreach": True, "weight_decay": 0.01, "decoupled": True}, Adam),
    (torch.optim.NAdam, {}, NAdam),
    (torch.optim.NAdam, {"foreach": True}, NAdam),
    (torch.optim.RAdam, {}, RAdam),
    (torch.optim.RAdam, {"foreach": True}, RAdam),
    (torch.optim.RMSprop, {}, RMSprop),
    (torch.optim.RMSprop, {"centered": True}, RMSprop),
    (torch.optim.RMSprop, {"momentum": 0.9, "centered": True, "foreach": True}, RMSprop),
    (torch.optim.Adagrad, {"lr_decay": 0.1}, Adagrad),
    (torch.optim.Adagrad, {"lr_decay": 0.05, "foreach": True}, Adagrad),
]


def _ids(case):
    cls, kw, _ = case
    return cls.__name__ + "".join(f"-{k}" for k in kw)


@pytest.mark.parametrize("case", CASES, ids=[_ids(c) for c in CASES])
def test_step_of_each_optimizer_matches_its_documented_algorithm(case):
    cls, kwargs, oracle_cls = case
    kwargs = dict(kwargs)
    oracle = oracle_cls(LR, **kwargs)
    kwargs.pop("decoupled", None)
    p = torch.nn.Parameter(torch.linspace(-1, 1, 5, dtype=torch.float64))
    opt = cls([p], lr=LR, **kwargs)
    for k, g in enumerate(_grads(), start=1):
        theta = p.detach().clone()
        p.grad = g.clone()
        opt.step()
        t_ref, bounded_ref, theta_ref = oracle.update(theta, g)
        torch.testing.assert_close(p.detach(), theta_ref, rtol=1e-12, atol=1e-15, msg=f"oracle's update, step {k}")
        metric = metric_rule(opt, opt.param_groups[0])(p)
        t = torch.as_tensor(metric if isinstance(metric, float) else metric.unbounded()).expand_as(p)  # RAdam unrectified: lr
        torch.testing.assert_close(t, t_ref, rtol=1e-12, atol=0, msg=f"the optimizer's own step, step {k}")
        bounded = torch.as_tensor(step_rule(opt, opt.param_groups[0])(p)).expand_as(p)
        torch.testing.assert_close(bounded, bounded_ref, rtol=1e-12, atol=0, msg=f"the bounded step, step {k}")
        assert (bounded <= t * (1 + 1e-12)).all()


def test_maximize_keeps_the_metric():
    p, q = (torch.nn.Parameter(torch.ones(5, dtype=torch.float64)) for _ in range(2))
    a, b = torch.optim.Adam([p], lr=LR), torch.optim.Adam([q], lr=LR, maximize=True)
    for g in _grads(3):
        p.grad, q.grad = g.clone(), g.clone()
        a.step()
        b.step()
    torch.testing.assert_close(step_rule(b, b.param_groups[0])(q), step_rule(a, a.param_groups[0])(p), rtol=0, atol=0)


@pytest.mark.parametrize("cls", [torch.optim.Adam, torch.optim.RAdam, torch.optim.NAdam, torch.optim.Adagrad])
@pytest.mark.parametrize("n", [3, 7])  # RAdam unrectified, rectified
def test_a_step_count_kept_on_the_device_gives_the_same_step(cls, n, monkeypatch):
    """capturable/fused keep ``step`` as a device tensor: the rule then works on 0-d tensors, no host read."""
    p = torch.nn.Parameter(torch.ones(5, dtype=torch.float64))
    opt = cls([p], lr=LR)
    for g in _grads(n):
        p.grad = g.clone()
        opt.step()
    as_float = torch.as_tensor(step_rule(opt, opt.param_groups[0])(p)).expand_as(p)
    monkeypatch.setattr(optimizer_steps, "_count", lambda state: state["step"].to(torch.float64))
    torch.testing.assert_close(step_rule(opt, opt.param_groups[0])(p), as_float, rtol=1e-14, atol=0)


class MyAdam(torch.optim.Adam):
    pass


def test_other_optimizers_get_the_plain_lr_and_unknown_adaptive_ones_are_named():
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.ones(3)
    sgd = torch.optim.SGD([p], lr=0.1, momentum=0.9, dampening=0.2)
    assert scalar_step(sgd, sgd.param_groups[0]) == pytest.approx(0.1 * 0.8 / 0.1, rel=1e-15)
    assert step_formula(sgd) == "SGD: lr * (1 - dampening) / (1 - momentum)"
    for opt, adaptive in [(torch.optim.SGD([p], lr=0.1), []), (torch.optim.Adamax([p], lr=0.1), ["exp_inf"]),
                          (MyAdam([p], lr=0.1), ["exp_avg_sq"]), (torch.optim.Adadelta([p], lr=0.1), ["square_avg", "acc_delta"])]:
        opt.step()
        assert step_rule(opt, opt.param_groups[0])(p) == 0.1
        assert not is_preconditioned(opt) and step_formula(opt).endswith(": lr")
        assert unknown_adaptive_state(opt) == adaptive
    adam = torch.optim.Adam([p])
    assert step_rule(adam, adam.param_groups[0])(p) == 1e-3  # no state yet: this parameter was not stepped
    assert is_preconditioned(adam) and "sqrt(v_hat)" in step_formula(adam) and unknown_adaptive_state(adam) == []


def test_lazy_steps_compute_each_step_when_read():
    calls = []
    steps = LazySteps(lambda p: calls.append(p) or p * 2, [torch.ones(1), torch.zeros(1)])
    assert len(steps) == 2 and calls == []
    assert [s.item() for s in steps] == [2.0, 0.0] and steps[0].item() == 2.0 and len(calls) == 3
