"""Parameter sets that change during a fit: fine-tuning, new optimizers, lazy layers, the learning-rate finder.

Oracles: hand-written SGD + soft-thresholding loops (float64), and the same fit without the change where
the change must not matter (plain SGD keeps no state, so a fresh optimizer steps as the old one would).
"""

import copy
import csv
import logging

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import BaseFinetuning, LearningRateFinder
from torch import nn

from lightreg import L1, Regularizer, WeightMonitor
from tests.models import TinyNet, loader, regression_data, trainer

LR, ALPHA, EPOCHS, BATCH = 0.05, 0.5, 2, 16


def soft(w, t):
    return w.sign() * (w.abs() - t).clamp(min=0)


class TrainableOnly(TinyNet):
    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=LR)


class UnfreezeBackbone(BaseFinetuning):
    """Lightning's fine-tuning recipe: net.0 frozen, then added to the optimizer at epoch 1 with lr LR/2."""

    def freeze_before_training(self, pl_module):
        self.freeze(pl_module.net[0])

    def finetune_function(self, pl_module, epoch, optimizer):
        if epoch == 1:
            self.unfreeze_and_add_param_group(pl_module.net[0], optimizer, initial_denom_lr=2.0)


def hand_written_finetuning():
    x, y = regression_data()
    model = TinyNet()
    model.net[0].requires_grad_(False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    selected = {id(model.net[0].weight), id(model.net[3].weight)}
    for epoch in range(EPOCHS):
        if epoch == 1:
            model.net[0].requires_grad_(True)
            opt.add_param_group({"params": list(model.net[0].parameters()), "lr": LR / 2})
        for bx, by in loader(x, y, BATCH):
            opt.zero_grad()
            nn.functional.mse_loss(model(bx), by).backward()
            opt.step()
            with torch.no_grad():
                for group in opt.param_groups:
                    for w in group["params"]:
                        if id(w) in selected and w.grad is not None:
                            w.copy_(soft(w, group["lr"] * ALPHA))
    return model


def test_a_backbone_unfrozen_and_added_by_base_finetuning_is_penalised_from_then_on(caplog):
    x, y = regression_data()
    model = TrainableOnly()
    reg = Regularizer(L1(ALPHA))
    with caplog.at_level(logging.INFO):
        trainer(max_epochs=EPOCHS, callbacks=[UnfreezeBackbone(), reg]).fit(model, loader(x, y, BATCH))
    assert "net.0.weight  (16, 8)  (not yet trainable, in no optimizer yet)" in caplog.text
    oracle = hand_written_finetuning()
    for (name, p), q in zip(model.named_parameters(), oracle.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-15, msg=name)
    assert (model.net[0].weight == 0).any()  # the prox reached the backbone
    assert [n for n, _ in reg.penalised()] == ["net.3.weight", "net.0.weight"]


class NewOptimizers(pl.Callback):
    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 1:
            trainer.strategy.setup_optimizers(trainer)


def test_optimizers_made_mid_fit_keep_the_penalty_and_the_monitor(tmp_path):
    x, y = regression_data()
    runs = {}
    for key, extra in (("new", [NewOptimizers()]), ("same", [])):
        model, reg = TinyNet(lr=LR), Regularizer(L1(ALPHA))
        logger = pl.loggers.CSVLogger(tmp_path, name=key)
        trainer(max_epochs=EPOCHS, callbacks=[*extra, reg, WeightMonitor(every_n_steps=1)], logger=logger,
                log_every_n_steps=1).fit(model, loader(x, y, BATCH))
        rows = list(csv.DictReader(open(f"{logger.log_dir}/metrics.csv")))
        runs[key] = model, reg, [r["step"] for r in rows if r.get("weights/global/sparsity")]
    (new, new_reg, new_steps), (same, same_reg, same_steps) = runs["new"], runs["same"]
    assert new.trainer.optimizers[0] is not None and new_reg.steps_applied == same_reg.steps_applied == 8
    assert new_steps == same_steps == [str(s) for s in range(8)]
    for p, q in zip(new.parameters(), same.parameters(), strict=True):
        assert torch.equal(p, q)  # plain SGD keeps no state: a fresh optimizer steps as the old one


class LazyNet(TinyNet):
    def __init__(self):
        super().__init__(lr=LR)
        self.net[0] = nn.LazyLinear(16, dtype=torch.float64)


class FirstState(pl.Callback):
    """The whole state once the lazy layer has materialised, before the first step changes it."""

    def on_before_backward(self, trainer, pl_module, loss):
        if trainer.global_step == 0 and not hasattr(self, "state"):
            self.state = copy.deepcopy(pl_module.state_dict())


def test_a_lazy_layer_is_penalised_once_materialised(caplog):
    x, y = regression_data()
    model, first, reg = LazyNet(), FirstState(), Regularizer(L1(ALPHA))
    with caplog.at_level(logging.INFO):
        trainer(max_epochs=EPOCHS, callbacks=[reg, first]).fit(model, loader(x, y, BATCH))
    assert "lazy, decided once materialised: net.0.weight, net.0.bias" in caplog.text
    oracle = TinyNet(lr=LR)
    oracle.load_state_dict(first.state)
    opt = torch.optim.SGD(oracle.parameters(), lr=LR)
    for _ in range(EPOCHS):
        for bx, by in loader(x, y, BATCH):
            opt.zero_grad()
            nn.functional.mse_loss(oracle(bx), by).backward()
            opt.step()
            with torch.no_grad():
                for w in (oracle.net[0].weight, oracle.net[3].weight):
                    w.copy_(soft(w, LR * ALPHA))
    for (name, p), q in zip(model.named_parameters(), oracle.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-15, msg=name)
    assert [n for n, _ in reg.penalised()] == ["net.0.weight", "net.3.weight"]


class FindLrAtEpochOne(LearningRateFinder):
    def on_fit_start(self, *args):
        pass

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 1:
            self.lr_find(trainer, pl_module)


class ProxCheck(pl.Callback):
    """At every step: the weights after it are soft(w - lr * g, lr * alpha) with the lr the optimizer used."""

    def __init__(self):
        self.checked = 0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        w = pl_module.net[0].weight
        self.before = (w.detach().clone(), w.grad.clone(), optimizer.param_groups[0]["lr"])

    def on_train_batch_end(self, trainer, pl_module, *args):
        w, g, lr = self.before
        torch.testing.assert_close(pl_module.net[0].weight, soft(w - lr * g, lr * ALPHA), rtol=1e-14, atol=0)
        self.checked += 1


@pytest.mark.filterwarnings("ignore:.*LR finder.*")
def test_the_prox_uses_the_live_lr_after_the_learning_rate_finder_restores_the_optimizer():
    x, y = regression_data()
    check = ProxCheck()
    finder = FindLrAtEpochOne(num_training_steps=3, early_stop_threshold=None, update_attr=False)
    trainer(max_epochs=EPOCHS, callbacks=[Regularizer(L1(ALPHA)), finder, check]).fit(
        TinyNet(lr=LR), loader(x, y, BATCH))
    assert check.checked == 8
