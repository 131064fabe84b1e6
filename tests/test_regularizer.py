"""The Regularizer callback in real Lightning fits, against independent oracles (float64)."""

import copy
import logging

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from sklearn.linear_model import ElasticNet as SkElasticNet
from sklearn.linear_model import Lasso
from torch import nn

from lightreg import L1, L2, ElasticNet, GroupLasso, Regularizer
from tests._readers import read_csv
from tests.models import TinyNet, loader, regression_data, trainer
from tests.oracles import explicit_value


def selected(m):
    return [m.net[0].weight, m.net[3].weight]


def fit(model, callbacks=(), data=None, **kwargs):
    x, y = data if data is not None else regression_data()
    batch_size = kwargs.pop("batch_size", 16)
    trainer(callbacks=list(callbacks), **{"max_epochs": 3, **kwargs}).fit(model, loader(x, y, batch_size))
    return model


def assert_same_weights(a, b, rtol=1e-12):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=rtol, atol=1e-14, msg=name)


PENALTIES = [L1(0.05), L2(0.3), ElasticNet(0.1, l1_ratio=0.4), GroupLasso(0.05, dim=0)]


@pytest.mark.parametrize("penalty", PENALTIES, ids=repr)
def test_gradient_mode_trains_like_the_penalty_in_the_loss(penalty):
    kw = dict(optimizer="sgd", optimizer_kwargs={"momentum": 0.9})
    ours = fit(TinyNet(**kw), [Regularizer(penalty, mode="gradient")])
    oracle = fit(TinyNet(**kw, extra_loss=lambda m: sum(explicit_value(penalty, w) for w in selected(m))))
    assert_same_weights(ours, oracle)
    assert not torch.equal(ours.net[0].weight, TinyNet().net[0].weight)


class GroupedNet(TinyNet):
    """Selected weights in one param group, the rest in another (for weight_decay comparisons)."""

    def __init__(self, opt_cls, decay, **kw):
        super().__init__(**kw)
        self.opt_cls, self.decay = opt_cls, decay

    def configure_optimizers(self):
        chosen = {id(p) for p in selected(self)}
        rest = [p for p in self.parameters() if id(p) not in chosen]
        return self.opt_cls(
            [{"params": selected(self), "weight_decay": self.decay}, {"params": rest, "weight_decay": 0.0}], lr=self.lr
        )


def test_gradient_l2_with_sgd_is_sgd_weight_decay():
    ours = fit(GroupedNet(torch.optim.SGD, 0.0), [Regularizer(L2(0.3), mode="gradient")])
    oracle = fit(GroupedNet(torch.optim.SGD, 0.3))
    assert_same_weights(ours, oracle, rtol=1e-15)


def test_decoupled_l2_with_adam_is_adamw():
    ours = fit(GroupedNet(torch.optim.Adam, 0.0, lr=0.01), [Regularizer(L2(0.3), mode="decoupled")])
    oracle = fit(GroupedNet(torch.optim.AdamW, 0.3, lr=0.01))
    assert_same_weights(ours, oracle, rtol=1e-15)


class LinearRegression(pl.LightningModule):
    """Least squares with loss mean((y - Xw)²)/2: scikit-learn's Lasso/ElasticNet data term."""

    def __init__(self, d, lr):
        super().__init__()
        self.linear = nn.Linear(d, 1, bias=False, dtype=torch.float64)
        nn.init.zeros_(self.linear.weight)
        self.lr = lr

    def training_step(self, batch, batch_idx):
        x, y = batch
        return 0.5 * ((self.linear(x).squeeze(1) - y) ** 2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def sparse_problem(n=200, d=30, k=5, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d))
    coef = np.zeros(d)
    coef[:k] = rng.choice([-1, 1], k) * rng.uniform(0.5, 2.0, k)
    y = x @ coef + 0.3 * rng.standard_normal(n)
    return x, y


@pytest.mark.parametrize("penalty, sk", [
    (L1(0.1), Lasso(alpha=0.1)),
    (ElasticNet(0.15, l1_ratio=0.5), SkElasticNet(alpha=0.15, l1_ratio=0.5)),
], ids=["lasso", "elastic_net"])
def test_proximal_full_batch_sgd_is_ista_and_reaches_scikit_learn(penalty, sk):
    x, y = sparse_problem()
    lipschitz = np.linalg.eigvalsh(x.T @ x / len(x)).max()
    steps = 600
    batches = [(torch.from_numpy(x), torch.from_numpy(y))] * steps  # the full batch, once per step
    model = LinearRegression(x.shape[1], lr=1.0 / lipschitz)
    trainer(callbacks=[Regularizer(penalty)], max_epochs=1).fit(
        model, torch.utils.data.DataLoader(batches, batch_size=None)
    )
    ours = model.linear.weight.detach().numpy().ravel()
    sk.set_params(fit_intercept=False, tol=1e-14, max_iter=100_000).fit(x, y)
    np.testing.assert_allclose(ours, sk.coef_, atol=1e-9)
    np.testing.assert_array_equal(ours == 0, sk.coef_ == 0)
    assert 5 <= (ours != 0).sum() < x.shape[1]  # sparse, and not trivially so


@pytest.mark.parametrize("mode", ["gradient", "decoupled", "proximal"])
def test_accumulation_applies_the_penalty_once_per_optimizer_step(mode):
    """Four accumulated micro-batches of 16 are one step on the batch of 64, penalty included."""
    penalty = ElasticNet(0.2, l1_ratio=0.5)
    acc_reg, full_reg = Regularizer(penalty, mode=mode), Regularizer(penalty, mode=mode)
    accumulated = fit(TinyNet(), [acc_reg], batch_size=16, accumulate_grad_batches=4)
    full = fit(TinyNet(), [full_reg], batch_size=64)
    assert acc_reg.steps_applied == full_reg.steps_applied == 3
    assert_same_weights(accumulated, full, rtol=1e-11)


class TwoGroups(TinyNet):
    def configure_optimizers(self):
        return torch.optim.SGD([{"params": self.net[0].parameters(), "lr": 0.1},
                                {"params": self.net[3].parameters(), "lr": 0.01},
                                {"params": self.net[1].parameters(), "lr": 0.5}], lr=1.0)


def test_proximal_uses_each_param_groups_own_lr():
    x, y = regression_data()
    model = TwoGroups()
    start = copy.deepcopy(model)
    loss = nn.functional.mse_loss(start(x), y)
    grads = torch.autograd.grad(loss, selected(start))
    fit(model, [Regularizer(L1(0.5))], data=(x, y), batch_size=64, max_epochs=1)
    for w0, g, w1, lr in zip(selected(start), grads, selected(model), (0.1, 0.01)):
        v = w0.detach() - lr * g
        expected = torch.sign(v) * torch.clamp(v.abs() - lr * 0.5, min=0)
        torch.testing.assert_close(w1, expected, rtol=1e-14, atol=0)


class TwoOptimizers(TinyNet):
    """Manual optimization with an optimizer per layer, as in GANs; ``raw`` steps the torch optimizers themselves."""

    def __init__(self, raw=False, **kw):
        super().__init__(**kw)
        self.automatic_optimization = False
        self.raw = raw

    def training_step(self, batch, batch_idx):
        opt_a, opt_b = self.optimizers(use_pl_optimizer=not self.raw)
        loss = super().training_step(batch, batch_idx)
        opt_a.zero_grad()
        opt_b.zero_grad()
        self.manual_backward(loss)
        opt_a.step()
        opt_b.step()

    def configure_optimizers(self):
        rest = [*self.net[1].parameters(), self.net[0].bias, self.net[3].bias]
        return (torch.optim.SGD([self.net[0].weight, *rest], lr=0.05),
                torch.optim.SGD([self.net[3].weight], lr=0.02))


@pytest.mark.parametrize("raw", [False, True], ids=["lightning_optimizer", "raw_optimizer"])
@pytest.mark.parametrize("mode", ["gradient", "decoupled", "proximal"])
def test_manual_optimization_with_two_optimizers(mode, raw):
    """Once per opt.step(), whether training_step steps the LightningOptimizer or the torch optimizer."""
    penalty = L1(0.1)
    reg = Regularizer(penalty, mode=mode)
    ours = fit(TwoOptimizers(raw=raw), [reg], max_epochs=1)
    assert reg.steps_applied == 2 * 4  # both optimizers, four batches
    x, y = regression_data()
    oracle = TwoOptimizers()
    opt_a, opt_b = oracle.configure_optimizers()
    for xb, yb in loader(x, y, 16):
        for opt in (opt_a, opt_b):
            opt.zero_grad()
        loss = nn.functional.mse_loss(oracle(xb), yb)
        if mode == "gradient":
            loss = loss + sum(explicit_value(penalty, w) for w in selected(oracle))
        loss.backward()
        for opt, w in ((opt_a, oracle.net[0].weight), (opt_b, oracle.net[3].weight)):
            lr = opt.param_groups[0]["lr"]
            with torch.no_grad():
                if mode == "decoupled":
                    w.sub_(lr * 0.1 * torch.sign(w))
            opt.step()
            with torch.no_grad():
                if mode == "proximal":
                    w.copy_(torch.sign(w) * torch.clamp(w.abs() - lr * 0.1, min=0))
    assert_same_weights(ours, oracle)


def test_stacked_regularizers_log_penalty_and_scheduled_alpha(tmp_path):
    first = Regularizer(L1(0.01), include="net.0.weight", name="first")
    rest = Regularizer(L2(0.1), mode="decoupled", include="net.3.*", schedule=lambda k: 0.5 * k)
    model = TinyNet()
    fit(model, [first, rest], logger=pl.loggers.CSVLogger(tmp_path), log_every_n_steps=1, max_epochs=1)
    rows = read_csv(tmp_path)
    alphas = [float(r["reg/l2/alpha"]) for r in rows if r.get("reg/l2/alpha")]
    assert alphas == pytest.approx([0.1 * 0.5 * k for k in range(4)])
    last_l1 = [float(r["reg/first/penalty"]) for r in rows if r.get("reg/first/penalty")][-1]
    assert last_l1 == pytest.approx(float(0.01 * model.net[0].weight.abs().sum()), rel=1e-6)
    last_l2 = [float(r["reg/l2/penalty"]) for r in rows if r.get("reg/l2/penalty")][-1]
    w3 = model.net[3]
    assert last_l2 == pytest.approx(float(0.15 * 0.5 * (w3.weight.square().sum() + w3.bias.square().sum())), rel=1e-6)
    assert {"reg/first/alpha", "reg/first/penalty", "reg/l2/alpha", "reg/l2/penalty"} <= set(rows[0])


def test_a_schedule_window_switches_the_penalty_on_and_off():
    reg = Regularizer(L1(10.0), schedule=lambda k: 1.0 if k == 2 else 0.0)
    seen = []

    class Spy(pl.Callback):
        def on_train_batch_end(self, trainer, *args):
            seen.append(float((selected(model)[0] == 0).float().mean()))

    model = TinyNet()
    fit(model, [reg, Spy()], max_epochs=1)
    assert seen[0] == seen[1] == 0.0 and seen[2] == 1.0  # strength 10 at step 2 zeroes the layer


def test_two_regularizers_with_one_name_are_refused_naming_name():
    model = TinyNet()
    before = copy.deepcopy(model.state_dict())
    regs = [Regularizer(L1(0.1), include="net.0.*"), Regularizer(L1(0.2), include="net.3.*")]
    with pytest.raises(ValueError, match=r"two Regularizers have name='l1': give each its own name="):
        fit(model, regs)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_double_weight_decay_is_warned_once():
    with pytest.warns(UserWarning, match="weight_decay > 0") as record:
        fit(TinyNet(optimizer_kwargs={"weight_decay": 0.1}), [Regularizer(L2(0.1))], max_epochs=1)
    assert sum("weight_decay > 0" in str(w.message) for w in record) == 1


def test_the_selection_is_reported_at_fit_start(caplog):
    with caplog.at_level(logging.INFO):
        fit(TinyNet(), [Regularizer(GroupLasso(0.1, dim=1))], max_epochs=1)
    assert "net.0.weight  (16, 8)" in caplog.text and "2 tensors, 144 weights" in caplog.text


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(include="decoder.*"), ValueError, "include pattern 'decoder"),
    (dict(penalty=GroupLasso(0.1, dim=3)), ValueError, "dim=3"),
])
def test_bad_selection_fails_before_any_weight_changes(kwargs, exc, match):
    model = TinyNet()
    before = copy.deepcopy(model.state_dict())
    reg = Regularizer(**{"penalty": L1(0.1), **kwargs})
    with pytest.raises(exc, match=match):
        fit(model, [reg])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class PartialOptimizer(TinyNet):
    def configure_optimizers(self):
        return torch.optim.SGD(self.net[3].parameters(), lr=0.1)


def test_a_selected_parameter_no_optimizer_holds_is_reported_and_left_alone(caplog):
    model = PartialOptimizer()
    before = model.net[0].weight.detach().clone()
    with caplog.at_level(logging.INFO):
        fit(model, [Regularizer(L1(0.1))], max_epochs=1)
    assert "net.0.weight  (16, 8)  (in no optimizer yet)" in caplog.text
    assert torch.equal(model.net[0].weight, before)  # no optimizer steps it: neither does the penalty


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(penalty=0.1), TypeError, "penalty"),
    (dict(penalty=torch.nn.L1Loss()), TypeError, "penalty"),
    (dict(mode="prox"), ValueError, "mode.*'prox'"),
    (dict(schedule=0.5), TypeError, "schedule"),
    (dict(include=[3]), TypeError, "include"),
    (dict(exclude={"a": 1}), TypeError, "exclude"),
    (dict(name="a/b"), ValueError, "name"),
])
def test_bad_constructor_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        Regularizer(**{"penalty": L1(0.1), **kwargs})


def test_a_schedule_returning_a_negative_factor_stops_before_the_step():
    model = TinyNet()
    before = copy.deepcopy(model.net[0].weight.detach())
    with pytest.raises(ValueError, match=r"schedule\(0\)"):
        fit(model, [Regularizer(L1(0.1), mode="gradient", schedule=lambda k: -1.0)])
    assert torch.equal(model.net[0].weight, before)
