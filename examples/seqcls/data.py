"""A generated sequence task: which of the marker tokens 1, 2, 3 occurs most often in a random sequence."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset


def make_sequences(n: int, seq_len: int, vocab_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` random sequences of tokens in ``[0, vocab_size)`` and their labels: the index (0, 1, 2) of the marker
    token (1, 2, 3) with the most occurrences, the smaller one on a tie.

    Example:
        >>> x, y = make_sequences(4, 10, 8, seed=0)
        >>> x.shape, y.shape, int(y.max()) <= 2
        (torch.Size([4, 10]), torch.Size([4]), True)
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab_size, (n, seq_len), generator=g)
    counts = torch.stack([(x == token).sum(dim=1) for token in (1, 2, 3)], dim=1)
    return x, counts.argmax(dim=1)


class SequenceData(pl.LightningDataModule):
    """Train, validation and test sequences, generated from ``seed``.

    ``describe()`` is the app's optional contract: the sizes a model may ask for by naming them in its ``__init__``.
    """

    def __init__(self, n_train: int = 2048, n_val: int = 512, n_test: int = 512, seq_len: int = 16, vocab_size: int = 8,
                 batch_size: int = 64, seed: int = 0) -> None:
        super().__init__()
        if vocab_size < 4:
            raise ValueError(f"vocab_size must be >= 4 (tokens 1, 2, 3 are the markers), got {vocab_size}")
        self.seq_len, self.vocab_size, self.batch_size = seq_len, vocab_size, batch_size
        self.splits = {name: TensorDataset(*make_sequences(n, seq_len, vocab_size, seed + i))
                       for i, (name, n) in enumerate((("train", n_train), ("val", n_val), ("test", n_test)))}

    def describe(self) -> dict[str, Any]:
        return {"vocab_size": self.vocab_size, "seq_len": self.seq_len, "num_classes": 3}

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.splits["train"], batch_size=self.batch_size, shuffle=True,
                          generator=torch.Generator().manual_seed(0))

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.splits["val"], batch_size=256)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.splits["test"], batch_size=256)
