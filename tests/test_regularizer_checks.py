"""What the Regularizer refuses at fit start, before any weight changes, each with one line naming the culprit."""

import copy
import csv

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightreg import L1, L2, ElasticNet, GroupLasso, LinearWarmup, Regularizer, WeightMonitor
from tests.models import TinyNet, loader, regression_data, trainer
from tests.oracles import explicit_prox


class WithOptimizer(TinyNet):
    def __init__(self, make_optimizer, **kw):
        super().__init__(**kw)
        self.make_optimizer = make_optimizer

    def configure_optimizers(self):
        return self.make_optimizer(self)


class WithExtra(TinyNet):
    """TinyNet plus one more module or parameter, used by the forward only where it can be."""

    def __init__(self, extra, **kw):
        super().__init__(**kw)
        self.extra = extra

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if isinstance(self.extra, nn.Embedding):
            loss = loss + self.extra(torch.zeros(1, dtype=torch.long)).sum()
        return loss


def frozen_param(t):
    return nn.Parameter(t, requires_grad=False)


REFUSED = {
    "lbfgs": (lambda: WithOptimizer(lambda m: torch.optim.LBFGS(m.parameters(), lr=0.1)), {},
              r"Regularizer 'l1': LBFGS is not supported \(it holds \['net.0.weight', 'net.3.weight'\]\)"),
    "maximize": (lambda: WithOptimizer(lambda m: torch.optim.SGD(
        [{"params": m.net[3].parameters()}, {"params": m.net[0].parameters(), "maximize": True}], lr=0.1)), {},
        r"Regularizer 'l1': SGD param group 1 has maximize=True \(it holds \['net.0.weight'\]\)"),
    "complex": (lambda: WithExtra(nn.Linear(2, 2, dtype=torch.complex128)), {},
                r"L1 does not support 'extra.weight': its dtype is torch.complex128"),
    "integer": (lambda: WithExtra(frozen_param(torch.zeros(2, 2, dtype=torch.long))), {"include": "*"},
                r"L1 does not support 'extra': its dtype is torch.int64"),
    "sparse_layout": (lambda: WithExtra(frozen_param(torch.eye(2, dtype=torch.float64).to_sparse())), {},
                      r"L1 does not support 'extra': its layout is torch.sparse_coo"),
    "sparse_embedding_gradient": (lambda: WithExtra(nn.Embedding(3, 2, sparse=True, dtype=torch.float64)),
                                  {"mode": "gradient"},
                                  r"'extra.weight' belongs to an Embedding with sparse=True.*mode='gradient'"),
    "group_lasso_dim": (lambda: TinyNet(), {"penalty": GroupLasso(0.1, dim=2)}, r"GroupLasso dim=2 is out of range"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_at_fit_start_before_any_weight_changes(case):
    make_model, kwargs, match = REFUSED[case]
    model = make_model()
    before = copy.deepcopy(model.state_dict())
    x, y = regression_data(n=16)
    with pytest.raises((ValueError, TypeError), match=match):
        trainer(callbacks=[Regularizer(**{"penalty": L1(0.1), **kwargs})]).fit(model, loader(x, y, 8))
    after = model.state_dict()
    dense = {k: v.to_dense() if v.is_sparse else v for k, v in before.items()}
    assert all(torch.equal(dense[k], after[k].to_dense() if after[k].is_sparse else after[k]) for k in before)


def test_the_monitor_refuses_a_complex_parameter_by_name():
    with pytest.raises(TypeError, match=r"WeightMonitor does not support 'extra.weight': its dtype is torch.complex128"):
        trainer(callbacks=[WeightMonitor()]).fit(WithExtra(nn.Linear(2, 2, dtype=torch.complex128)),
                                                 loader(*regression_data(n=16), 8))


def test_an_empty_include_is_refused_at_construction():
    with pytest.raises(ValueError, match=r"include=\[\] selects no parameter; pass include=None"):
        Regularizer(L1(0.1), include=[])
    with pytest.raises(ValueError, match=r"include=\[\]"):
        WeightMonitor(include=())


@pytest.mark.parametrize("penalty", [L1(1.0), ElasticNet(1.0, l1_ratio=0.5)], ids=repr)
def test_float16_prox_with_a_threshold_beyond_float16_is_exact(penalty):
    """lr * alpha * l1_ratio >= 1e5 > 65504: every float16 weight goes to zero, as the float64 formula says."""
    w = torch.randn(4, 3, generator=torch.Generator().manual_seed(0)).half()
    ours = w.clone()
    penalty.apply_prox_([ours], 2e5, 1.0)
    torch.testing.assert_close(ours, explicit_prox(penalty, w.double(), 2e5).half(), rtol=0, atol=0)


@pytest.mark.parametrize("step", [float("inf"), torch.full((4, 3), float("inf"), dtype=torch.float64)], ids=["float", "tensor"])
def test_elastic_net_without_l1_part_never_forms_a_nan_threshold(step):
    w = torch.randn(4, 3, dtype=torch.float64)
    expected = L2(1.0).prox(w, step, 1.0)  # l1_ratio=0 is L2: an infinite step sends w to 0
    assert torch.equal(ElasticNet(1.0, l1_ratio=0.0).prox(w, step, 1.0), expected)
    assert torch.equal(expected, torch.zeros_like(w))


def test_alpha_is_the_scheduled_one_before_any_step(tmp_path):
    reg = Regularizer(L1(0.1), schedule=LinearWarmup(4, start=0.25))
    trainer(callbacks=[reg], max_steps=0).fit(TinyNet(), loader(*regression_data(n=16), 8))
    assert reg.metrics()["reg/l1/alpha"] == 0.1 * 0.25


def test_a_name_containing_a_slash_is_refused_and_parameter_names_are_kept_verbatim(tmp_path):
    with pytest.raises(ValueError, match="name must be a non-empty string without '/'"):
        Regularizer(L1(0.1), name="a/b")
    model = WithExtra(nn.ModuleDict({"a/b": nn.Linear(2, 2, dtype=torch.float64)}))
    monitor = WeightMonitor(every_n_steps=1, include="extra.*.weight")
    logger = pl.loggers.CSVLogger(tmp_path)
    trainer(callbacks=[monitor], logger=logger, max_steps=1, log_every_n_steps=1).fit(
        model, loader(*regression_data(n=16), 8))
    rows = list(csv.DictReader(open(f"{logger.log_dir}/metrics.csv")))
    assert "weights/extra.a/b.weight/l1" in rows[0]  # documented: the figure is after the last '/'


def test_a_schedule_with_raw_optimizers_under_manual_optimization_is_warned_about():
    from tests.test_regularizer import TwoOptimizers

    with pytest.warns(UserWarning, match="global_step does not advance.*schedule stays at step 0"):
        trainer(callbacks=[Regularizer(L1(0.1), schedule=LinearWarmup(4))]).fit(
            TwoOptimizers(raw=True), loader(*regression_data(n=16), 8))
