"""Small LightningModules and data shared by the tests (float64-friendly, deterministic)."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def regression_data(n: int = 64, d: int = 8, out: int = 1, seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    w = torch.randn(d, out, generator=g, dtype=dtype)
    y = x @ w + 0.1 * torch.randn(n, out, generator=g, dtype=dtype)
    return x, y


def loader(x, y, batch_size: int | None = None, shuffle: bool = False) -> DataLoader:
    return DataLoader(TensorDataset(x, y), batch_size=batch_size or len(x), shuffle=shuffle)


class TinyNet(pl.LightningModule):
    """An MLP with a LayerNorm: ``net.0`` Linear(d, h), ``net.1`` LayerNorm, ``net.3`` Linear(h, out).

    ``optimizer`` picks the optimizer; ``extra_loss`` lets a test add the penalty to the loss itself,
    the oracle for mode ``gradient``.
    """

    def __init__(self, d=8, h=16, out=1, optimizer="sgd", lr=0.05, dtype=torch.float64, seed=0,
                 extra_loss=None, optimizer_kwargs=None):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(d, h), nn.LayerNorm(h), nn.Tanh(), nn.Linear(h, out)).to(dtype)
        self.optimizer, self.lr = optimizer, lr
        self.optimizer_kwargs = optimizer_kwargs or {}
        self.extra_loss = extra_loss

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        if self.extra_loss is not None:
            loss = loss + self.extra_loss(self)
        return loss

    def configure_optimizers(self):
        cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[self.optimizer]
        return cls(self.parameters(), lr=self.lr, **self.optimizer_kwargs)


class ShardedNet(TinyNet):
    """TinyNet with each Linear, then the whole MLP, wrapped by ``fully_shard`` on the data-parallel mesh (FSDP2)."""

    def configure_model(self):
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        fully_shard(self.net[0], mesh=mesh)
        fully_shard(self.net[3], mesh=mesh)
        fully_shard(self.net, mesh=mesh)


def trainer(**kwargs) -> pl.Trainer:
    defaults = dict(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, max_epochs=1,
    )
    defaults.update(kwargs)
    return pl.Trainer(**defaults)
