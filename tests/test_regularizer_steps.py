"""The penalty acts on exactly the parameters each optimizer step steps, once per step (float64 oracles).

Oracles: ``torch.optim.AdamW`` and ``SGD(weight_decay=...)`` (which skip a parameter without a gradient),
and hand-written loops that apply the penalty once per optimizer step.
"""

import copy

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightreg import L1, L2, ElasticNet, Regularizer
from tests.models import TinyNet, loader, regression_data, trainer
from tests.oracles import explicit_prox, explicit_value

LR, EPOCHS, BATCH = 0.05, 2, 16
FREEZE_AT, SKIP_AT = 5, 2  # global steps: net.0 frozen from step 5 on; training_step returns None at step 2


def branch_loss(model, batch, batch_idx, step):
    """MSE of the MLP plus a branch used on even batches only; ``None`` (a skipped batch) at ``SKIP_AT``."""
    if step == SKIP_AT:
        return None
    x, y = batch
    out = model(x) + (model.branch(x) if batch_idx % 2 == 0 else 0.0)
    return nn.functional.mse_loss(out, y)


class Branchy(TinyNet):
    """TinyNet with a branch unused on odd batches, a skipped batch, and ``net.0`` frozen mid-fit."""

    def __init__(self, opt_cls, decay=0.0, **kw):
        super().__init__(lr=LR, **kw)
        self.branch = nn.Linear(8, 1, dtype=torch.float64)
        self.opt_cls, self.decay, self.opt_kw = opt_cls, decay, kw.get("optimizer_kwargs", {})

    def selected(self):
        return [self.net[0].weight, self.net[3].weight, self.branch.weight]

    def on_train_batch_start(self, batch, batch_idx):
        if self.global_step == FREEZE_AT:
            self.net[0].requires_grad_(False)

    def training_step(self, batch, batch_idx):
        return branch_loss(self, batch, batch_idx, self.global_step)

    def configure_optimizers(self):
        chosen = {id(p) for p in self.selected()}
        rest = [p for p in self.parameters() if id(p) not in chosen]
        return self.opt_cls([{"params": self.selected(), "weight_decay": self.decay},
                             {"params": rest, "weight_decay": 0.0}], lr=LR, **self.opt_kw)


def fit_branchy(model, callbacks=()):
    x, y = regression_data()
    trainer(max_epochs=EPOCHS, callbacks=list(callbacks)).fit(model, loader(x, y, BATCH))
    return model


def hand_written_proximal(alpha):
    """SGD then soft-thresholding of the selected weights that had a gradient, by hand."""
    x, y = regression_data()
    model = Branchy(torch.optim.SGD)
    opt = model.configure_optimizers()
    step = 0
    for _ in range(EPOCHS):
        for batch_idx, batch in enumerate(loader(x, y, BATCH)):
            if step == FREEZE_AT:
                model.net[0].requires_grad_(False)
            opt.zero_grad(set_to_none=True)
            loss = branch_loss(model, batch, batch_idx, step)
            if loss is not None:
                loss.backward()
            opt.step()
            with torch.no_grad():
                for w in model.selected():
                    if w.grad is not None:
                        w.copy_(w.sign() * (w.abs() - LR * alpha).clamp(min=0))
            step += 1
    return model


def assert_same(a, b, rtol):
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=rtol, atol=1e-15, msg=name)


class FrozenSnapshot(pl.Callback):
    """The weight of net.0 when it is frozen (callbacks' batch-start hooks run before the module's)."""

    def __init__(self):
        self.weight = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == FREEZE_AT:
            self.weight = pl_module.net[0].weight.detach().clone()


CASES = {
    "decoupled-adam=adamw": (Regularizer(L2(0.5), mode="decoupled"), dict(opt_cls=torch.optim.Adam),
                             lambda: fit_branchy(Branchy(torch.optim.AdamW, 0.5))),
    "gradient-sgd=sgd_weight_decay": (Regularizer(L2(0.5), mode="gradient"),
                                      dict(opt_cls=torch.optim.SGD, optimizer_kwargs={"momentum": 0.9}),
                                      lambda: fit_branchy(Branchy(torch.optim.SGD, 0.5, optimizer_kwargs={"momentum": 0.9}))),
    "proximal-sgd=hand_written": (Regularizer(L1(0.3)), dict(opt_cls=torch.optim.SGD), lambda: hand_written_proximal(0.3)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_unused_branch_frozen_layer_and_skipped_batch_are_left_as_the_optimizer_leaves_them(case):
    reg, model_kw, oracle = CASES[case]
    snapshot = FrozenSnapshot()
    ours = fit_branchy(Branchy(**model_kw), [copy.deepcopy(reg), snapshot])
    assert_same(ours, oracle(), rtol=1e-13)
    assert torch.equal(ours.net[0].weight, snapshot.weight)  # the untouched weight of the frozen layer


ACC, WINDOW_BATCHES = 3, 8  # one epoch of windows of 3, 3 and 2 micro-batches


def hand_written_accumulation(penalty, mode):
    """Lightning's accumulation written out (each micro-batch loss / ACC, a step after 3, 3 and 2 of them)
    with the penalty once per optimizer step, at full strength, whatever the window's size."""
    x, y = regression_data(n=WINDOW_BATCHES * BATCH)
    model = TinyNet(lr=LR)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    selected = [model.net[0].weight, model.net[3].weight]
    batches = list(loader(x, y, BATCH))
    for start in range(0, len(batches), ACC):
        opt.zero_grad()
        for bx, by in batches[start:start + ACC]:
            (nn.functional.mse_loss(model(bx), by) / ACC).backward()
        if mode == "gradient":
            sum(explicit_value(penalty, w) for w in selected).backward()
        with torch.no_grad():
            if mode == "decoupled":
                for w in selected:
                    rho = penalty.l1_ratio
                    w.sub_(LR * penalty.alpha * (rho * w.sign() + (1 - rho) * w))
            opt.step()
            if mode == "proximal":  # momentum 0.9 moves a weight by LR / (1 - 0.9) per unit of steady gradient
                for w in selected:
                    w.copy_(explicit_prox(penalty, w, LR / (1 - 0.9)))
    return model


@pytest.mark.parametrize("mode", ["gradient", "decoupled", "proximal"])
def test_a_partial_accumulation_window_gets_the_penalty_once_at_full_strength(mode):
    penalty = ElasticNet(0.2, l1_ratio=0.5)
    reg = Regularizer(penalty, mode=mode)
    x, y = regression_data(n=WINDOW_BATCHES * BATCH)
    model = TinyNet(lr=LR, optimizer_kwargs={"momentum": 0.9})
    trainer(max_epochs=1, callbacks=[reg], accumulate_grad_batches=ACC).fit(model, loader(x, y, BATCH))
    assert reg.steps_applied == 3
    assert_same(model, hand_written_accumulation(penalty, mode), rtol=1e-12)
