"""The adaptive prox step is safe: lr = 0 changes nothing, unstepped coordinates (v = 0) are not wiped, an always-zero
feature still ends at exactly 0 and the Lasso optimum is kept; every optimizer lightreg does not know is named once."""

import warnings

import numpy as np
import pytest
import torch
from lightning.pytorch import LightningModule
from sklearn.datasets import load_diabetes
from sklearn.linear_model import Lasso
from torch import nn

from lightreg import L0, L1, L2, ElasticNet, GroupLasso, Regularizer, register_step_rule
from lightreg.proximal.fused_prox import apply_prox
from lightreg.proximal.metric import REGISTERED, LazySteps, base_optimizer, metric_rule, step_rule
from tests.models import loader, regression_data, trainer


def _prox_after_step(opt, penalty, params, alpha=None):
    group = opt.param_groups[0]
    with torch.no_grad():
        apply_prox(penalty, params, LazySteps(step_rule(opt, group), params, metric_rule(opt, group)),
                   penalty.alpha if alpha is None else alpha)


@pytest.mark.parametrize("penalty", [L1(1e-5), L1(1e-6), L0(1e-6), ElasticNet(1e-5, 0.5)], ids=repr)
def test_unseen_embedding_rows_are_not_wiped_in_one_step(penalty):
    """Adam(1e-3) + L1(1e-5) used to zero 68 % of the unseen rows' entries in one step (t = lr / eps there)."""
    torch.manual_seed(0)
    emb = nn.Embedding(1000, 16)
    opt = torch.optim.Adam(emb.parameters(), lr=1e-3)
    before = emb.weight.detach().clone()
    seen = torch.arange(0, 1000, 50)
    emb(seen).pow(2).sum().backward()
    opt.step()
    unbounded = metric_rule(opt, opt.param_groups[0])(emb.weight).unbounded()
    unseen = torch.ones(1000, dtype=torch.bool)
    unseen[seen] = False
    assert (unbounded[unseen] > 1e4).all()  # lr / eps: what the prox took before the bound
    _prox_after_step(opt, penalty, [emb.weight])
    w = emb.weight.detach()
    # The unseen rows take the typical step of the seen ones: t = lr / sqrt(mean v_hat) (Adam's first step: v_hat = g²).
    g = 2 * before[seen]
    typical = 1e-3 / (g.square().mean().sqrt() + 1e-8)
    assert typical < 1.0
    assert (w[unseen] == 0).float().mean() < 1e-3
    threshold = typical * penalty.alpha * getattr(penalty, "l1_ratio", 1.0)
    if isinstance(penalty, L0):
        threshold = (2 * typical * penalty.alpha).sqrt()
    assert ((w[unseen] == 0) == (before[unseen].abs() <= threshold * (1 + 1e-5))).all()


def _diabetes_with_a_dead_feature():
    x, y = load_diabetes(return_X_y=True)
    x, y = (x - x.mean(0)) / x.std(0), (y - y.mean()) / y.std()
    return np.concatenate([x, np.zeros((len(x), 1))], axis=1), y


def test_an_always_zero_feature_ends_exactly_zero_and_the_rest_reaches_the_lasso():
    """Adam never steps the dead feature's weight (its gradient is always 0, so v = 0): the prox alone takes it to 0,
    at the typical step; the other weights still reach scikit-learn's optimum (the bound does not touch them)."""
    x, y = _diabetes_with_a_dead_feature()
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    w = torch.zeros(x.shape[1], dtype=torch.float64)
    w[-1] = 0.5  # pretrained: far from 0
    w.requires_grad_(True)
    opt, penalty = torch.optim.Adam([w], lr=0.05), L1(0.05)
    zero_at = None
    for k in range(700):
        opt.zero_grad()
        (0.5 * ((xt @ w - yt) ** 2).mean()).backward()
        opt.step()
        _prox_after_step(opt, penalty, [w])
        if zero_at is None and w[-1] == 0:
            zero_at = k
    assert zero_at is not None and zero_at < 100 and w[-1].item() == 0.0
    optimum = Lasso(alpha=0.05, fit_intercept=False, tol=1e-14, max_iter=100_000).fit(x[:, :-1], y).coef_
    np.testing.assert_allclose(w.detach().numpy()[:-1], optimum, atol=1e-6)
    np.testing.assert_array_equal(w.detach().numpy()[:-1] == 0, optimum == 0)


class LrZero(LightningModule):
    """A warm-up from 0 that never leaves it: every step has lr = 0, so nothing may change."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 1)).double()
        with torch.no_grad():
            self.net[0].weight[2].zero_()  # an all-zero group: GroupLasso's 0/0 when t = 0

    def training_step(self, batch, batch_idx):
        x, y = batch
        return ((self.net(x) - y) ** 2).mean()

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=0.1)
        return [opt], [{"scheduler": torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.0), "interval": "step"}]


@pytest.mark.parametrize("penalty", [L1(0.1), L2(0.1), ElasticNet(0.1), L0(0.1), GroupLasso(0.1), GroupLasso(0.1, dim=1)],
                         ids=repr)
def test_a_step_with_lr_zero_changes_no_weight(penalty):
    x, y = regression_data()
    model = LrZero()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer(callbacks=[Regularizer(penalty)], max_epochs=1).fit(model, loader(x, y, 16))
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


def test_group_lasso_metric_prox_at_step_zero_is_the_identity():
    w = torch.tensor([[0.0, 0.0], [1.0, -2.0]])
    out = GroupLasso(1.0).prox(w, torch.zeros_like(w), 1.0)
    assert torch.equal(out, w)
    assert torch.equal(GroupLasso(1.0).prox(w, 0.0, 1.0), w)


class Lion(torch.optim.Optimizer):
    """A hand-written Lion (Chen et al. 2023): its state is ``exp_avg`` only, nothing that looks adaptive."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.99)):
        super().__init__(params, dict(lr=lr, betas=betas))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                m = self.state[p].setdefault("exp_avg", torch.zeros_like(p))
                b1, b2 = group["betas"]
                p.add_((b1 * m + (1 - b1) * p.grad).sign(), alpha=-group["lr"])
                m.mul_(b2).add_(p.grad, alpha=1 - b2)
        return loss


class Lookahead(torch.optim.Optimizer):
    """A Lookahead-style wrapper (Zhang et al. 2019): it steps ``base_optimizer``, shares its groups and state."""

    def __init__(self, base_optimizer, k=5, alpha=0.5):
        self.base_optimizer, self.k, self.alpha, self.count = base_optimizer, k, alpha, 0
        self.defaults, self.param_groups, self.state = base_optimizer.defaults, base_optimizer.param_groups, base_optimizer.state
        self._optimizer_step_pre_hooks, self._optimizer_step_post_hooks = {}, {}
        self.slow = [p.detach().clone() for g in self.param_groups for p in g["params"]]

    @torch.no_grad()
    def step(self, closure=None):
        loss = self.base_optimizer.step(closure)
        self.count += 1
        if self.count % self.k == 0:
            for slow, p in zip(self.slow, (p for g in self.param_groups for p in g["params"])):
                slow.add_(p - slow, alpha=self.alpha)
                p.copy_(slow)
        return loss


class WithOptimizer(LightningModule):
    def __init__(self, make):
        super().__init__()
        torch.manual_seed(0)
        self.net, self.make = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 1)).double(), make

    def training_step(self, batch, batch_idx):
        x, y = batch
        return ((self.net(x) - y) ** 2).mean()

    def configure_optimizers(self):
        return self.make(self.parameters())


@pytest.mark.parametrize("make, name", [(lambda ps: Lion(ps), "Lion"), (lambda ps: torch.optim.Adadelta(ps), "Adadelta"),
                                        (lambda ps: torch.optim.Rprop(ps, lr=0.01), "Rprop")], ids=["Lion", "Adadelta", "Rprop"])
def test_every_unknown_optimizer_is_warned_once_by_name(make, name):
    x, y = regression_data()
    with pytest.warns(UserWarning, match=f"{name} .*not an optimizer whose step lightreg knows.*register_step_rule") as record:
        trainer(callbacks=[Regularizer(L1(0.01))], max_epochs=2).fit(WithOptimizer(make), loader(x, y, 16))
    assert sum("lightreg knows" in str(w.message) for w in record) == 1


def test_a_registered_rule_is_used_and_silences_the_warning():
    calls = []

    def lion_rule(optimizer, group):
        def rule(p):
            calls.append(p)
            return float(group["lr"])
        return rule

    register_step_rule(Lion, lion_rule)
    try:
        x, y = regression_data()
        with warnings.catch_warnings():
            warnings.filterwarnings("error", ".*lightreg knows.*")
            trainer(callbacks=[Regularizer(L1(0.01))], max_epochs=1).fit(WithOptimizer(Lion), loader(x, y, 16))
        assert calls
    finally:
        del REGISTERED[Lion]
    with pytest.raises(TypeError, match="optimizer_class must be a class"):
        register_step_rule("Lion", lion_rule)


def test_a_lookahead_wrapper_is_looked_through_and_its_adam_reaches_the_lasso():
    """The wrapper's inner Adam gives the step; with it the fixed point is still scikit-learn's (Lookahead's
    interpolation between two points near the optimum keeps it)."""
    x, y = load_diabetes(return_X_y=True)
    x, y = (x - x.mean(0)) / x.std(0), (y - y.mean()) / y.std()
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    opt, penalty = Lookahead(torch.optim.Adam([w], lr=0.05)), L1(0.05)
    assert isinstance(base_optimizer(opt), torch.optim.Adam)
    for _ in range(1500):
        opt.zero_grad()
        (0.5 * ((xt @ w - yt) ** 2).mean()).backward()
        opt.step()
        _prox_after_step(opt, penalty, [w])
    optimum = Lasso(alpha=0.05, fit_intercept=False, tol=1e-14, max_iter=100_000).fit(x, y).coef_
    # Unwrapped, the plain lr ended 0.46 from the optimum with no zeros; the slow weights converge more slowly.
    np.testing.assert_allclose(w.detach().numpy(), optimum, atol=1e-4)
    np.testing.assert_array_equal(w.detach().numpy() == 0, optimum == 0)


def test_asgd_step_is_the_eta_it_took():
    """Oracle: ASGD's own update ``p <- p (1 - lambd eta) - eta g`` solved for eta from the weights it wrote."""
    p = torch.nn.Parameter(torch.linspace(0.5, 2.0, 4, dtype=torch.float64))
    opt = torch.optim.ASGD([p], lr=0.1, lambd=0.05, alpha=0.75)
    g = torch.Generator().manual_seed(0)
    for k in range(5):
        before = p.detach().clone()
        p.grad = torch.randn(4, generator=g, dtype=torch.float64)
        opt.step()
        eta = (before - p.detach()) / (0.05 * before + p.grad)
        torch.testing.assert_close(torch.full_like(eta, step_rule(opt, opt.param_groups[0])(p)), eta, rtol=1e-6, atol=0)  # eta is kept in float32


@pytest.mark.parametrize("make", [lambda ps: torch.optim.Adagrad(ps, lr=1e-2),
                                  lambda ps: torch.optim.Adam(ps, lr=1e-3, eps=1e-7),
                                  lambda ps: torch.optim.Adam(ps, lr=1e-3, eps=1e-10)],
                         ids=["adagrad", "adam_eps_1e-7", "adam_eps_1e-10"])
def test_the_bound_holds_whatever_eps(make):
    """Found by trying it: on the CPU the bound was skipped where float32(sqrt(0)/d + eps) rounds above the Python
    eps (Adagrad's 1e-10, Keras's 1e-7), and every unseen row of an embedding was zeroed in one step."""
    torch.manual_seed(0)
    emb = nn.Embedding(500, 8)
    opt = make(emb.parameters())
    before = emb.weight.detach().clone()
    seen = torch.arange(20)
    emb(seen).pow(2).sum().backward()
    opt.step()
    unseen = torch.ones(500, dtype=torch.bool)
    unseen[seen] = False
    own = metric_rule(opt, opt.param_groups[0])(emb.weight).unbounded()
    t = step_rule(opt, opt.param_groups[0])(emb.weight)
    assert torch.equal(t[~unseen], own[~unseen])  # a stepped coordinate keeps the optimizer's own step
    # An unseen one takes the step of a coordinate of typical v: one value, within the stepped ones' range.
    typical = t[unseen].unique()
    assert typical.numel() == 1 and own[~unseen].min() <= typical.item() <= own[~unseen].max()
    _prox_after_step(opt, L1(1e-3), [emb.weight])
    assert (emb.weight.detach()[unseen] == 0).float().mean() < 1e-3
    assert (emb.weight.detach()[unseen] != before[unseen]).any()  # shrunk by the typical step, not left alone


class BareLookahead(torch.optim.Optimizer):
    """torch_optimizer's pattern: a wrapper that never calls ``Optimizer.__init__`` (no step-hook tables of its own)."""

    def __init__(self, base_optimizer, k=2, alpha=0.5):
        self.optimizer, self.k, self.alpha, self.count = base_optimizer, k, alpha, 0
        self.param_groups, self.defaults, self.state = base_optimizer.param_groups, base_optimizer.defaults, base_optimizer.state
        self.slow = [p.detach().clone() for g in self.param_groups for p in g["params"]]

    def step(self, closure=None):
        loss = self.optimizer.step(closure)
        self.count += 1
        if self.count % self.k == 0:
            self.interpolate()
        return loss

    @torch.no_grad()
    def interpolate(self):
        for slow, p in zip(self.slow, (p for g in self.param_groups for p in g["params"])):
            slow.add_(p - slow, alpha=self.alpha)
            p.copy_(slow)

    def zero_grad(self, set_to_none=True):
        self.optimizer.zero_grad(set_to_none)

    def state_dict(self):
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict):
        self.optimizer.load_state_dict(state_dict)


def test_a_wrapper_without_hook_tables_is_hooked_through_its_inner_optimizer():
    """Oracle: a hand loop: the inner Adam's step, the prox in its metric, then Lookahead's interpolation."""
    x, y = regression_data()
    model = WithOptimizer(lambda ps: BareLookahead(torch.optim.Adam(ps, lr=0.01)))
    hand = WithOptimizer(lambda ps: BareLookahead(torch.optim.Adam(ps, lr=0.01)))
    trainer(callbacks=[Regularizer(L1(0.01))], max_epochs=5).fit(model, loader(x, y, len(x)))
    opt = hand.configure_optimizers()
    weights = [hand.net[0].weight, hand.net[1].weight]
    for _ in range(5):
        opt.zero_grad()
        hand.training_step((x, y), 0).backward()
        opt.optimizer.step()
        _prox_after_step(opt.optimizer, L1(0.01), weights)
        opt.count += 1
        if opt.count % opt.k == 0:
            opt.interpolate()
    for got, expected in zip(model.parameters(), hand.parameters(), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)
