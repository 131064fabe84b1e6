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


def fit(batch_size: int, target: float | None = None, **kw) -> dict:
    x, y = data()
    model = Net()
    reg = Regularizer(CoupledGroupLasso(0.0 if target else 0.05), target_sparsity=target, target_every=None if target is None else 2)
    trainer = pl.Trainer(max_epochs=8, callbacks=[reg], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                         use_distributed_sampler=False, **kw)
    rank = trainer.global_rank if kw else 0
    trainer.fit(model, loader(x[rank::2] if kw else x, y[rank::2] if kw else y, batch_size=batch_size))
    metrics = reg.metrics()
    return {"weights": {n: p.detach().clone() for n, p in model.named_parameters()},
            "alive": metrics["reg/coupled_group_lasso/groups_alive"],
            "sparsity": float(metrics.get("reg/coupled_group_lasso/sparsity", -1.0))}


def _worker(rank: int) -> dict:
    return fit(N // 2, strategy=DDPStrategy(process_group_backend="gloo"), devices=2)


def _target_worker(rank: int) -> dict:
    return fit(N // 2, 0.5, strategy=DDPStrategy(process_group_backend="gloo"), devices=2)


def test_ddp_equals_one_process(tmp_path):
    ranks = run_on_ranks(_worker, tmp_path)
    one = fit(N)
    for name, w in one["weights"].items():
        assert torch.equal(ranks[0]["weights"][name], ranks[1]["weights"][name]), name
        torch.testing.assert_close(ranks[0]["weights"][name], w, rtol=1e-9, atol=1e-11, msg=name)
    assert ranks[0]["alive"] == one["alive"] < 16


def test_ddp_target_takes_the_same_decision_on_every_rank(tmp_path):
    """With target_sparsity=0.5 (level every 2 steps, zeros held between): the same zeros on both ranks, equal to one
    process, and exactly half of the 16 coupled groups zero at the end."""
    ranks = run_on_ranks(_target_worker, tmp_path)
    one = fit(N, 0.5)
    for name, w in one["weights"].items():
        assert torch.equal(ranks[0]["weights"][name], ranks[1]["weights"][name]), name
        torch.testing.assert_close(ranks[0]["weights"][name], w, rtol=1e-9, atol=1e-11, msg=name)
        assert torch.equal(ranks[0]["weights"][name] == 0, w == 0), name
    assert ranks[0]["alive"] == ranks[1]["alive"] == one["alive"] == 8 and one["sparsity"] == 0.5
