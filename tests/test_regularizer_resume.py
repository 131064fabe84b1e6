"""Checkpoint and resume: the interrupted run ends with exactly the uninterrupted run's weights."""

import lightning.pytorch as pl
import pytest
import torch

from lightreg import L1, L2, CosineSchedule, ElasticNet, LinearWarmup, Regularizer
from tests.models import TinyNet, loader, regression_data, trainer


def regularizers():
    # Float32 on purpose: see shared/pitfalls.md on float64 resume drift in plain Lightning.
    return [
        Regularizer(L1(0.02), include="net.0.weight", schedule=LinearWarmup(6), name="first_l1"),
        Regularizer(L2(0.5), mode="decoupled", include="net.3.weight", schedule=CosineSchedule(10)),
    ]


def run(tmp_path, max_epochs, ckpt_path=None, save=False):
    x, y = regression_data(dtype=torch.float32)
    model = TinyNet(optimizer="adam", lr=0.01, dtype=torch.float32)
    regs = regularizers()
    callbacks = [*regs]
    if save:
        callbacks.append(pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0))
    trainer(callbacks=callbacks, max_epochs=max_epochs, enable_checkpointing=save).fit(
        model, loader(x, y, batch_size=16), ckpt_path=ckpt_path
    )
    return model, regs


def test_resume_with_two_stacked_regularizers_and_schedules_is_exact(tmp_path):
    full, full_regs = run(tmp_path / "full", max_epochs=4)
    run(tmp_path / "part", max_epochs=2, save=True)
    ckpt = tmp_path / "part" / "last.ckpt"
    state = torch.load(ckpt, weights_only=False)["callbacks"]
    assert state["Regularizer{'name': 'first_l1'}"]["steps_applied"] == 8
    assert state["Regularizer{'name': 'l2'}"]["steps_applied"] == 8
    resumed, resumed_regs = run(tmp_path / "resumed", max_epochs=4, ckpt_path=ckpt)
    for (name, p), q in zip(full.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name
    assert [r.steps_applied for r in resumed_regs] == [r.steps_applied for r in full_regs] == [16, 16]
    assert (full.net[0].weight == 0).any()  # the L1 layer went (partly) sparse: the test exercises the prox


SCHEDULERS = {
    "step_lr": lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5),
    "one_cycle_per_step": lambda opt: {"scheduler": torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=0.05, total_steps=16), "interval": "step"},
    # threshold=1: no epoch counts as an improvement, so the lr halves after every epoch
    "plateau": lambda opt: {"scheduler": torch.optim.lr_scheduler.ReduceLROnPlateau(
        opt, factor=0.5, patience=0, threshold=1.0), "monitor": "train_loss"},
}


class ScheduledNet(TinyNet):
    def __init__(self, scheduler):
        super().__init__(optimizer="adam", lr=0.01, dtype=torch.float32)
        self.scheduler = scheduler

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss

    def configure_optimizers(self):
        optimizer = super().configure_optimizers()
        return {"optimizer": optimizer, "lr_scheduler": SCHEDULERS[self.scheduler](optimizer)}


def scheduled_run(path, scheduler, max_epochs, ckpt_path=None, save=False):
    x, y = regression_data(dtype=torch.float32)
    model = ScheduledNet(scheduler)
    regs = [Regularizer(ElasticNet(2.0, 0.5), include="net.0.weight", schedule=LinearWarmup(6), name="prox"),
            Regularizer(L2(0.5), mode="decoupled", include="net.3.weight", schedule=CosineSchedule(10), name="decay")]
    callbacks = [*regs]
    if save:
        callbacks.append(pl.callbacks.ModelCheckpoint(dirpath=path, save_last=True, save_top_k=0))
    trainer(callbacks=callbacks, max_epochs=max_epochs, enable_checkpointing=save).fit(
        model, loader(x, y, batch_size=16), ckpt_path=ckpt_path)
    return model


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_resume_with_an_lr_scheduler_is_bit_exact_in_both_modes(tmp_path, scheduler):
    """The optimizer's param groups are new dicts after the restore: the penalty must read their lr."""
    full = scheduled_run(tmp_path / "full", scheduler, max_epochs=4)
    scheduled_run(tmp_path / "part", scheduler, max_epochs=2, save=True)
    resumed = scheduled_run(tmp_path / "resumed", scheduler, 4, ckpt_path=tmp_path / "part" / "last.ckpt")
    lrs = [g["lr"] for g in full.trainer.optimizers[0].param_groups]
    assert lrs != [0.01]  # the scheduler really changed the lr
    for (name, p), q in zip(full.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name
    assert (full.net[0].weight == 0).any()  # the prox acted
