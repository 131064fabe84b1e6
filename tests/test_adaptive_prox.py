"""The preconditioned proximal step with adaptive optimizers reaches scikit-learn's lasso / elastic-net optimum.

Diabetes (scikit-learn, standardised), full batch, float64, loss mean((y - Xw)²) / 2, w = 0 at the start. The oracle is
scikit-learn's coordinate descent; the plain-lr prox with Adam is checked to end far from it (what the default fixes).
"""

import logging

import numpy as np
import pytest
import torch
from lightning.pytorch import LightningModule
from sklearn.datasets import load_diabetes
from sklearn.linear_model import ElasticNet as SkElasticNet
from sklearn.linear_model import Lasso
from torch import nn

from lightreg import L0, L1, ElasticNet, GroupLasso, Regularizer
from lightreg.proximal.metric import step_formula, step_rule
from tests.models import TinyNet, loader, regression_data, trainer


@pytest.fixture(scope="module")
def diabetes():
    x, y = load_diabetes(return_X_y=True)
    return (x - x.mean(0)) / x.std(0), (y - y.mean()) / y.std()


def sklearn_optimum(sk, x, y):
    return sk.set_params(fit_intercept=False, tol=1e-14, max_iter=100_000).fit(x, y).coef_


def assert_reaches(ours, optimum, atol=1e-6):
    np.testing.assert_allclose(ours, optimum, atol=atol)
    np.testing.assert_array_equal(ours == 0, optimum == 0)
    assert 0 < (optimum == 0).sum() < len(optimum)


class Regression(LightningModule):
    def __init__(self, d, optimizer, lr, **kwargs):
        super().__init__()
        self.linear = nn.Linear(d, 1, bias=False, dtype=torch.float64)
        nn.init.zeros_(self.linear.weight)
        self.opt = (optimizer, lr, kwargs)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return 0.5 * ((self.linear(x).squeeze(1) - y) ** 2).mean()

    def configure_optimizers(self):
        cls, lr, kwargs = self.opt
        return cls(self.parameters(), lr=lr, **kwargs)


def fit_full_batch(x, y, regularizer, optimizer=torch.optim.Adam, lr=0.05, steps=700, **kwargs):
    batch = (torch.from_numpy(x), torch.from_numpy(y))
    model = Regression(x.shape[1], optimizer, lr, **kwargs)
    trainer(callbacks=[regularizer], max_epochs=1).fit(model, torch.utils.data.DataLoader([batch] * steps, batch_size=None))
    return model.linear.weight.detach().numpy().ravel()


@pytest.mark.parametrize("penalty, sk", [(L1(0.05), Lasso(alpha=0.05)), (L1(0.2), Lasso(alpha=0.2)),
                                         (ElasticNet(0.05, l1_ratio=0.5), SkElasticNet(alpha=0.05, l1_ratio=0.5))],
                         ids=["lasso", "lasso-0.2", "elastic_net"])
def test_adam_with_the_default_proximal_mode_reaches_scikit_learn(diabetes, penalty, sk):
    x, y = diabetes
    assert_reaches(fit_full_batch(x, y, Regularizer(penalty)), sklearn_optimum(sk, x, y))


def test_the_plain_lr_prox_with_adam_misses_the_optimum(diabetes):
    x, y = diabetes
    ours = fit_full_batch(x, y, Regularizer(L1(0.05), preconditioned=False))
    optimum = sklearn_optimum(Lasso(alpha=0.05), x, y)
    assert np.abs(ours - optimum).max() > 0.1 and (ours == 0).sum() < (optimum == 0).sum()


# (optimizer, lr, kwargs, steps). Centered RMSprop is left out: on a deterministic problem the gradient's
# variance, its denominator, goes to 0 at the optimum and its steps blow up, with or without a penalty.
OPTIMIZERS = [
    (torch.optim.AdamW, 0.05, {"weight_decay": 0.0}, 700), (torch.optim.Adam, 0.05, {"amsgrad": True}, 700),
    (torch.optim.NAdam, 0.05, {}, 500), (torch.optim.RAdam, 0.05, {}, 700), (torch.optim.RMSprop, 0.01, {}, 500),
    (torch.optim.RMSprop, 0.005, {"momentum": 0.5}, 1000), (torch.optim.Adagrad, 0.5, {"lr_decay": 1e-4}, 500),
]


@pytest.mark.parametrize("optimizer, lr, kwargs, steps", OPTIMIZERS, ids=lambda v: getattr(v, "__name__", str(v)))
def test_every_supported_optimizer_reaches_the_lasso(diabetes, optimizer, lr, kwargs, steps):
    """A plain loop over the pure parts (step_rule, then the penalty's prox): the same fixed point for each."""
    x, y = diabetes
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    opt, penalty = optimizer([w], lr=lr, **kwargs), L1(0.05)
    for _ in range(steps):
        opt.zero_grad()
        (0.5 * ((xt @ w - yt) ** 2).mean()).backward()
        opt.step()
        with torch.no_grad():
            penalty.apply_prox_([w], [step_rule(opt, opt.param_groups[0])(w)])
    assert_reaches(w.detach().numpy(), sklearn_optimum(Lasso(alpha=0.05), x, y))


@pytest.mark.parametrize("kwargs", [{"momentum": 0.9}, {"momentum": 0.8, "nesterov": True}, {"momentum": 0.5, "dampening": 0.3}],
                         ids=["heavy_ball", "nesterov", "dampened"])
def test_sgd_with_momentum_reaches_the_lasso_not_a_weaker_one(diabetes, kwargs):
    """Momentum moves a weight by lr (1 - dampening) / (1 - momentum) per unit of steady gradient: the prox takes
    that step, so the fixed point is Lasso(alpha). With the plain lr it is Lasso((1 - momentum) alpha / (1 - dampening))."""
    x, y = diabetes
    factor = (1 - kwargs.get("dampening", 0.0)) / (1 - kwargs["momentum"])
    ours = fit_full_batch(x, y, Regularizer(L1(0.05)), optimizer=torch.optim.SGD, lr=0.05, steps=1500, **kwargs)
    assert_reaches(ours, sklearn_optimum(Lasso(alpha=0.05), x, y))
    plain = fit_full_batch(x, y, Regularizer(L1(0.05), preconditioned=False), optimizer=torch.optim.SGD, lr=0.05,
                           steps=1500, **kwargs)
    assert_reaches(plain, sklearn_optimum(Lasso(alpha=0.05 / factor), x, y))


def test_sgd_without_momentum_keeps_the_plain_lr_bit_for_bit():
    x, y = regression_data()
    runs = []
    for preconditioned in (True, False):
        model = TinyNet()
        trainer(callbacks=[Regularizer(L1(0.05), preconditioned=preconditioned)], max_epochs=2).fit(model, loader(x, y, 16))
        runs.append(model)
    for p, q in zip(runs[0].parameters(), runs[1].parameters()):
        assert torch.equal(p, q)


def test_the_fit_start_report_names_each_optimizers_step(caplog):
    x, y = regression_data()
    with caplog.at_level(logging.INFO):
        trainer(callbacks=[Regularizer(L1(0.01))], max_epochs=1).fit(TinyNet(optimizer="adamw"), loader(x, y, 16))
        trainer(callbacks=[Regularizer(L1(0.01))], max_epochs=1).fit(TinyNet(), loader(x, y, 16))
        trainer(callbacks=[Regularizer(L1(0.01), preconditioned=False)], max_epochs=1).fit(TinyNet(optimizer="adam"),
                                                                                             loader(x, y, 16))
    assert "prox step  AdamW: lr / (sqrt(v_hat) + eps)" in caplog.text
    assert "prox step  SGD: lr" in caplog.text and "prox step  Adam: lr\n" in caplog.text + "\n"


class AdamaxNet(TinyNet):
    def configure_optimizers(self):
        return torch.optim.Adamax(self.parameters(), lr=0.01)


def test_an_unknown_adaptive_optimizer_is_warned_once_and_gets_the_plain_lr():
    x, y = regression_data()
    with pytest.warns(UserWarning, match="Adamax keeps per-coordinate state \\['exp_inf'\\]") as record:
        trainer(callbacks=[Regularizer(L1(0.01))], max_epochs=2).fit(AdamaxNet(), loader(x, y, 16))
    assert sum("Adamax" in str(w.message) for w in record) == 1


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(penalty=L0(0.1), mode="gradient"), ValueError, "only with mode='proximal'"),
    (dict(penalty=L0(0.1), mode="decoupled"), ValueError, "only with mode='proximal'"),
    (dict(preconditioned="yes"), TypeError, "preconditioned"),
    (dict(target_sparsity=0.9, mode="gradient"), ValueError, "needs mode='proximal'"),
    (dict(penalty=ElasticNet(0.1, 0.0), target_sparsity=0.9), ValueError, "makes zeros"),
    (dict(target_sparsity=0.9, schedule=lambda k: 1.0), ValueError, "no schedule"),
    (dict(target_sparsity=1.0), ValueError, "target_sparsity must be in"),
    (dict(target_sparsity=0.5, target_ramp=(10, 5)), ValueError, "start before it ends"),
    (dict(target_sparsity=0.5, target_every=0), ValueError, "target_every"),
])
def test_bad_arguments_are_refused_at_construction(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        Regularizer(**{"penalty": L1(0.1), **kwargs})


def test_repr_shows_the_non_default_sparsity_arguments():
    assert repr(Regularizer(GroupLasso(0.1), preconditioned=False, target_sparsity=0.5)).endswith(
        "name='group_lasso', preconditioned=False, target_sparsity=0.5)")


def test_sparse_adam_on_a_sparse_embedding_reaches_the_lasso(diabetes, one_thread):
    """(One thread: torch's sparse-into-dense add spins its threads on tiny tensors, 10x slower on two busy cores.)
    SparseAdam (sparse gradients, eps added to sqrt(v)): a sparse Embedding whose rows are the features' weights,
    looked up whole and multiplied by the features, is the lasso's linear model. A plain loop over the pure parts
    (step_rule with SparseAdam's own step, then the prox) reaches scikit-learn's solution, zeros included."""
    x, y = diabetes
    xt, yt, d = torch.from_numpy(x), torch.from_numpy(y), x.shape[1]
    rows = nn.Embedding(d, 1, sparse=True, dtype=torch.float64)
    nn.init.zeros_(rows.weight)
    opt, penalty = torch.optim.SparseAdam(rows.parameters(), lr=0.1), L1(0.05)
    assert "SparseAdam: lr * sqrt(1 - beta2^step)" in step_formula(opt)
    for _ in range(300):  # the plain lr instead ends 0.35 away
        opt.zero_grad()
        (0.5 * ((xt @ rows(torch.arange(d)).squeeze(1) - yt) ** 2).mean()).backward()
        opt.step()
        with torch.no_grad():
            penalty.apply_prox_([rows.weight], [step_rule(opt, opt.param_groups[0])(rows.weight)])
    assert_reaches(rows.weight.detach().numpy().ravel(), sklearn_optimum(Lasso(alpha=0.05), x, y))
