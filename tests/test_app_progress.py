"""The app's progress lines off a terminal: one per epoch, with the model's metrics even when none is on the bar."""

import logging

import lightning.pytorch as pl
import torch
from torch import nn

from lightreg import L1, Regularizer
from lightreg.app.progress import EpochLines


class Quiet(pl.LightningModule):
    """Logs its loss, but not with prog_bar=True."""

    def __init__(self, prog_bar=False):
        super().__init__()
        self.net, self.prog_bar = nn.Linear(4, 1), prog_bar

    def training_step(self, batch, batch_idx):
        loss = self.net(batch).pow(2).mean()
        self.log("my_loss", loss, on_epoch=True, on_step=False, prog_bar=self.prog_bar)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _lines(caplog, model):
    trainer = pl.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_model_summary=False,
                         callbacks=[EpochLines(), Regularizer(L1(1e-3))])
    with caplog.at_level(logging.INFO, logger="lightreg.app"):
        trainer.fit(model, torch.utils.data.DataLoader(torch.randn(8, 4), batch_size=4))
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch=")]


def test_a_model_that_puts_nothing_on_the_bar_still_shows_what_it_logs(caplog):
    lines = _lines(caplog, Quiet())
    assert [line.split()[:2] for line in lines] == [["epoch=0", "step=2"], ["epoch=1", "step=4"]]
    assert all("my_loss=" in line for line in lines), lines
    assert not any("weights/" in line for line in lines)


def test_metrics_on_the_bar_are_the_ones_shown(caplog):
    lines = _lines(caplog, Quiet(prog_bar=True))
    assert lines and all("my_loss=" in line and "reg/" not in line for line in lines), lines
