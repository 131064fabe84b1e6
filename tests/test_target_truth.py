"""A target that tells the truth: a fit of unknown length, a fit that ends early, raw optimizers in manual optimization."""

import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import EarlyStopping
from torch.utils.data import DataLoader, IterableDataset

from lightreg import L0, L1, Regularizer
from tests.models import TinyNet, loader, regression_data, trainer


def selected(m):
    return [m.net[0].weight, m.net[3].weight]


def sparsity(m):
    return sum(int((w == 0).sum()) for w in selected(m)) / sum(w.numel() for w in selected(m))


class Stream(IterableDataset):
    """A data stream without ``len``: 40 samples in batches of 4, the same every epoch."""

    def __iter__(self):
        x, y = regression_data(n=40, dtype=torch.float32)
        return iter(zip(x, y))


@pytest.mark.parametrize("window", [{}, {"target_ramp": (0, 10), "target_debias": 5}], ids=["default", "debias_in_steps"])
def test_a_fit_of_unknown_length_says_what_to_set_before_any_weight_changes(window):
    """A debias phase is the end of the fit, in steps too: the advice must not suggest one (found by trying it)."""
    model = TinyNet(h=32, optimizer="adam", lr=0.01, dtype=torch.float32)
    before = [w.detach().clone() for w in selected(model)]
    with pytest.raises(ValueError, match=r"no known length.*estimated_stepping_batches = -1.*max_steps.*step counts \(ints\) and no target_debias"):
        trainer(callbacks=[Regularizer(L0(0.0), target_sparsity=0.75, **window)]).fit(model, DataLoader(Stream(), batch_size=4))
    assert all(torch.equal(a, b) for a, b in zip(before, selected(model)))


def test_a_fit_of_unknown_length_with_the_ramp_in_steps_ends_on_the_target():
    reg = Regularizer(L0(0.0), target_sparsity=0.75, target_ramp=(0, 6))  # frozen from step 6 on
    model = TinyNet(h=32, optimizer="adam", lr=0.01, dtype=torch.float32)
    trainer(callbacks=[reg]).fit(model, DataLoader(Stream(), batch_size=4))  # 10 steps
    assert reg.target.window.freeze == 6 and sparsity(model) == 0.75


class Progress(TinyNet):
    def training_step(self, batch, batch_idx):
        self.log("progress", float(self.global_step))
        return super().training_step(batch, batch_idx)


def fit_with(callbacks, epochs=6):
    x, y = regression_data(dtype=torch.float32)
    model = Progress(h=32, optimizer="adam", lr=0.01, dtype=torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(callbacks=callbacks, max_epochs=epochs).fit(model, loader(x, y, batch_size=16))  # 4 steps an epoch
    return model, [str(w.message) for w in caught if "before the sparsity target" in str(w.message)]


def test_a_fit_stopped_early_warns_with_the_sparsity_reached():
    reg = Regularizer(L1(0.0), target_sparsity=0.75)  # ramp over steps [0, 16) of 24
    stop = EarlyStopping(monitor="progress", mode="max", stopping_threshold=7.0, check_on_train_epoch_end=True)
    model, messages = fit_with([reg, stop])
    assert model.global_step < 16 and len(messages) == 1
    assert f"sparsity reached {sparsity(model):.4f} against target_sparsity=0.75" in messages[0]
    assert f"after {model.global_step} optimizer steps" in messages[0] and sparsity(model) < 0.75


def test_a_fit_that_reaches_the_target_does_not_warn():
    model, messages = fit_with([Regularizer(L1(0.0), target_sparsity=0.75)])
    assert messages == [] and sparsity(model) == 0.75


class Manual(TinyNet):
    """Manual optimization; ``raw``: the torch optimizer itself, which does not advance ``trainer.global_step``."""

    def __init__(self, raw, **kwargs):
        super().__init__(**kwargs)
        self.raw, self.automatic_optimization = raw, False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers(use_pl_optimizer=not self.raw)
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(self(batch[0]), batch[1])
        self.manual_backward(loss)
        opt.step()


@pytest.mark.parametrize("penalty", [L0(0.0), L1(0.0)], ids=str)
def test_raw_optimizers_in_manual_optimization_reach_the_target_as_lightning_optimizers_do(penalty):
    """The ramp counts the steps the callback's hooks saw; the oracle: the same fit stepping ``LightningOptimizer``s."""
    x, y = regression_data(dtype=torch.float32)
    models, regs = {}, {}
    for raw in (True, False):
        models[raw] = Manual(raw, h=32, optimizer="adam", lr=0.01, dtype=torch.float32)
        regs[raw] = Regularizer(penalty, target_sparsity=0.75)
        trainer(callbacks=[regs[raw]], max_epochs=6).fit(models[raw], loader(x, y, batch_size=16))
    assert models[True].global_step == 0 and models[False].global_step == 24
    assert sparsity(models[True]) == 0.75
    for p, q in zip(models[True].parameters(), models[False].parameters()):
        assert torch.equal(p, q)
