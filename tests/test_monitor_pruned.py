"""The monitor, the report and the Regularizer under pruning, and with zero-size parameters.

Oracles: explicit counts of the zeros of the effective weight (``weight_orig * weight_mask``, what the
module computes with), and a hand-written ISTA loop on the pruned parametrisation.
"""

import csv

import lightning.pytorch as pl
import torch
import wandb
from lightning.pytorch.callbacks import ModelPruning
from torch import nn
from torch.nn.utils import prune

from lightreg import L1, Regularizer, WeightMonitor, print_report, sparsity_report
from lightreg.stats.report import REPORT_COLUMNS, overall_sparsity
from lightreg.callbacks.wandb_extras import table_data
from tests.models import TinyNet, loader, regression_data, trainer

LR, ALPHA = 0.05, 0.3


def zeros_of(module, attr="weight"):
    """Explicit count of exact zeros of what ``module`` computes with, over its size."""
    w = getattr(module, f"{attr}_orig") * getattr(module, f"{attr}_mask") if hasattr(module, f"{attr}_mask") \
        else getattr(module, attr)
    return sum(v == 0 for v in w.detach().flatten().tolist()) / w.numel()


def test_sparsity_report_measures_the_effective_weight_of_a_pruned_layer_under_its_own_name():
    model = TinyNet()
    prune.l1_unstructured(model.net[0], "weight", amount=0.5)
    assert "net.0.weight_orig" in dict(model.named_parameters())
    rows = {r["name"]: r for r in sparsity_report(model)}
    assert list(rows) == ["net.0.weight", "net.3.weight"]
    assert rows["net.0.weight"]["sparsity"] == zeros_of(model.net[0]) == 0.5
    assert rows["net.0.weight"]["l1"] == float(model.net[0].weight.abs().sum())


class Effective(pl.Callback):
    """Per step, the explicit zero fraction of net.0's effective weight."""

    def __init__(self):
        self.sparsity = {}

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.sparsity[trainer.global_step - 1] = zeros_of(pl_module.net[0])


def test_the_monitor_logs_the_effective_weight_under_model_pruning(tmp_path):
    model = TinyNet(lr=LR)
    effective = Effective()
    pruning = ModelPruning("l1_unstructured", amount=0.5, parameters_to_prune=[(model.net[0], "weight")],
                           make_pruning_permanent=False, verbose=0)
    logger = pl.loggers.CSVLogger(tmp_path)
    trainer(max_epochs=2, callbacks=[pruning, WeightMonitor(every_n_steps=1), effective], logger=logger,
            log_every_n_steps=1).fit(model, loader(*regression_data(), 16))
    logged = {int(r["step"]): float(r["weights/net.0.weight/sparsity"])
              for r in csv.DictReader(open(f"{logger.log_dir}/metrics.csv")) if r.get("weights/net.0.weight/sparsity")}
    assert logged == effective.sparsity
    assert logged[7] >= 0.5  # pruned at the end of epoch 0: the monitor saw it


def test_the_regularizer_penalises_the_parameter_a_pruned_layer_steps():
    """``weight_orig`` is what the optimizer steps: the penalty acts on it, named ``net.0.weight``."""
    x, y = regression_data()
    model, oracle = TinyNet(lr=LR), TinyNet(lr=LR)
    for m in (model, oracle):
        prune.l1_unstructured(m.net[0], "weight", amount=0.25)
    reg = Regularizer(L1(ALPHA), include=["net.0.weight", "net.3.weight"])
    trainer(max_epochs=2, callbacks=[reg]).fit(model, loader(x, y, 16))
    assert [(n, p is model.net[0].weight_orig) for n, p in reg.penalised()][0] == ("net.0.weight", True)
    opt = torch.optim.SGD(oracle.parameters(), lr=LR)
    for _ in range(2):
        for bx, by in loader(x, y, 16):
            opt.zero_grad()
            nn.functional.mse_loss(oracle(bx), by).backward()
            opt.step()
            with torch.no_grad():
                for w in (oracle.net[0].weight_orig, oracle.net[3].weight):
                    w.copy_(w.sign() * (w.abs() - LR * ALPHA).clamp(min=0))
    for (name, p), q in zip(model.named_parameters(), oracle.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-15, msg=name)


class WithEmptyLayer(TinyNet):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.empty = nn.Linear(4, 0, dtype=torch.float64)


def test_a_zero_size_parameter_breaks_no_report_table_or_total(capsys):
    model = WithEmptyLayer(lr=LR)
    trainer(max_epochs=1, callbacks=[Regularizer(L1(ALPHA)), WeightMonitor(print_table=True)]).fit(
        model, loader(*regression_data(), 16))
    assert "empty.weight" in capsys.readouterr().out  # the table printed at fit end, the empty row included
    rows = sparsity_report(model)
    assert [r["name"] for r in rows] == ["net.0.weight", "net.3.weight", "empty.weight"]
    weights = [model.net[0].weight, model.net[3].weight]
    expected = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert overall_sparsity(rows) == expected > 0
    print_report(rows)
    assert "0x4" in capsys.readouterr().out
    wandb.Table(columns=list(REPORT_COLUMNS), data=table_data(rows))  # the W&B table accepts the empty row
