"""CoupledGroupLasso under DDP (2 CPU processes, gloo): ranks identical and equal to one process on the global batch.

Parameters are replicated under DDP, so every rank traces the same groups and applies the same prox to the same
all-reduced state. Float64 full-batch steps: the only difference is the order of the gradient sums.
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy
from torch import nn

from lightreg import CoupledGroupLasso, Regularizer
from tests._spawn import run_on_ranks
from tests.models import loader

pytestmark = pytest.mark.slow
N = 32


class Net(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)).double()
        self.example_input_array = torch.zeros(2, 6, dtype=torch.float64)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, _):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.05)


def data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(N, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (N,), generator=g)


def fit(batch_size: int, **kw) -> dict:
    x, y = data()
    model, reg = Net(), Regularizer(CoupledGroupLasso(0.05))
    trainer = pl.Trainer(max_epochs=8, callbacks=[reg], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                         use_distributed_sampler=False, **kw)
    rank = trainer.global_rank if kw else 0
    trainer.fit(model, loader(x[rank::2] if kw else x, y[rank::2] if kw else y, batch_size=batch_size))
    return {"weights": {n: p.detach().clone() for n, p in model.named_parameters()},
            "alive": reg.metrics()["reg/coupled_group_lasso/groups_alive"]}


def _worker(rank: int) -> dict:
    return fit(N // 2, strategy=DDPStrategy(process_group_backend="gloo"), devices=2)


def test_ddp_equals_one_process(tmp_path):
    ranks = run_on_ranks(_worker, tmp_path)
    one = fit(N)
    for name, w in one["weights"].items():
        assert torch.equal(ranks[0]["weights"][name], ranks[1]["weights"][name]), name
        torch.testing.assert_close(ranks[0]["weights"][name], w, rtol=1e-9, atol=1e-11, msg=name)
    assert ranks[0]["alive"] == one["alive"] < 16
