"""A small Transformer encoder that classifies token sequences: embedding, positions, encoder layers, mean pooling,
and an MLP head (an ``nn.Sequential``, so ``lightreg.shrink`` can cut the hidden units a group lasso kills)."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import Tensor, nn


class SequenceClassifier(pl.LightningModule):
    """``vocab_size``, ``seq_len`` and ``num_classes`` come from the data (``SequenceData.describe()``) unless set.

    Example:
        >>> model = SequenceClassifier(vocab_size=8, seq_len=5, num_classes=3, d_model=8, nhead=2, layers=1)
        >>> model(torch.zeros(2, 5, dtype=torch.long)).shape
        torch.Size([2, 3])
    """

    def __init__(self, vocab_size: int, seq_len: int, num_classes: int, d_model: int = 32, nhead: int = 4,
                 layers: int = 2, feedforward: int = 64, hidden: int = 32, lr: float = 3e-3,
                 weight_decay: float = 0.0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.embed = nn.Embedding(vocab_size, d_model)
        self.position = nn.Embedding(seq_len, d_model)
        layer = nn.TransformerEncoderLayer(d_model, nhead, feedforward, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Sequential(nn.Linear(d_model, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    def forward(self, tokens: Tensor) -> Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        h = self.encoder(self.embed(tokens) + self.position(positions))
        return self.head(h.mean(dim=1))

    def _step(self, batch: tuple[Tensor, Tensor], stage: str) -> Tensor:
        x, y = batch
        logits = self(x)
        loss = nn.functional.cross_entropy(logits, y)
        self.log(f"{stage}/loss", loss, on_step=False, on_epoch=True, sync_dist=True, prog_bar=stage == "val")
        self.log(f"{stage}/accuracy", (logits.argmax(dim=1) == y).float().mean(), on_step=False, on_epoch=True,
                 sync_dist=True, prog_bar=stage == "val")
        return loss

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._step(batch, "test")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)

    def configure_model(self) -> None:
        # Only under FSDP2 (Lightning's ModelParallelStrategy) is there a device mesh: shard every part.
        if self.device_mesh is None:
            return
        from torch.distributed.fsdp import FSDPModule, fully_shard

        if isinstance(self.head, FSDPModule):  # fit sharded it already; test calls this hook again
            return
        mesh = self.device_mesh["data_parallel"]
        for module in (*self.encoder.layers, self.embed, self.position, self.head):
            fully_shard(module, mesh=mesh)
