"""The app's datasets: scikit-learn's bundled tables and a sparse linear problem with a known support.

Every set is split train/val/test with a seeded permutation and standardised with the training split's
mean and standard deviation (``z = (x - mean_train) / std_train``, constant columns left at scale 1), so
one ``alpha`` means the same thing on every feature. Regression targets are standardised the same way:
MSE is then in units of the target's variance and ``1 - MSE`` is about R².
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightreg.app.arguments import check_tabular

SKLEARN_SETS = {
    # name: (loader name in sklearn.datasets, task)
    "digits": ("load_digits", "classification"),
    "breast_cancer": ("load_breast_cancer", "classification"),
    "diabetes": ("load_diabetes", "regression"),
}


def sparse_linear_problem(
    n_samples: int, n_features: int, n_informative: int, noise: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``y = X w + noise * e`` with ``X, e ~ N(0, 1)`` and ``w`` nonzero on ``n_informative`` random features.

    The nonzero coefficients are ``±U(1, 2)``, far enough from zero that a lasso which finds the support
    is clearly right. Returns ``(X, y, support)``, ``support`` a boolean mask over the features.

    Example:
        >>> x, y, support = sparse_linear_problem(20, 6, 2, 0.0, seed=0)
        >>> x.shape, y.shape, int(support.sum())
        ((20, 6), (20,), 2)
    """
    if not 0 < n_informative <= n_features:
        raise ValueError(f"n_informative must be in [1, n_features={n_features}], got {n_informative}")
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n_samples, n_features))
    support = np.zeros(n_features, dtype=bool)
    support[rng.choice(n_features, n_informative, replace=False)] = True
    w = np.zeros(n_features)
    w[support] = rng.choice([-1.0, 1.0], n_informative) * rng.uniform(1.0, 2.0, n_informative)
    y = x @ w + noise * rng.standard_normal(n_samples)
    return x, y, support


def split_indices(n: int, val_fraction: float, test_fraction: float, seed: int) -> tuple[np.ndarray, ...]:
    """A seeded permutation of ``range(n)`` cut into train, val and test index arrays.

    Example:
        >>> [len(i) for i in split_indices(10, 0.2, 0.2, seed=0)]
        [6, 2, 2]
    """
    if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"val_fraction={val_fraction} and test_fraction={test_fraction} must be in (0, 1) with sum < 1")
    order = np.random.default_rng(seed).permutation(n)
    n_val, n_test = round(n * val_fraction), round(n * test_fraction)
    return order[n_val + n_test :], order[:n_val], order[n_val : n_val + n_test]


def standardize(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    """Scale every array with the mean and std of ``train``; a constant column keeps scale 1.

    Example:
        >>> a, b = standardize(np.array([[0.0, 5.0], [2.0, 5.0]]), np.array([[4.0, 6.0]]))
        >>> a.tolist(), b.tolist()
        ([[-1.0, 0.0], [1.0, 0.0]], [[3.0, 1.0]])
    """
    mean, std = train.mean(axis=0), train.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    return [(a - mean) / std for a in (train, *others)]


class TabularData(pl.LightningDataModule):
    """One of ``digits``, ``breast_cancer``, ``diabetes`` (scikit-learn, bundled) or ``synthetic``.

    After ``setup()``: ``task`` (``"classification"`` or ``"regression"``), ``num_features``,
    ``num_outputs`` (classes, or 1), ``input_shape`` (``(1, 8, 8)`` for digits, else ``(num_features,)``)
    and ``true_support`` (the informative features of ``synthetic``, else ``None``).

    Args:
        name: which dataset.
        batch_size: training batch size, or ``None`` for the whole training split (full-batch gradient
            descent: with a proximal penalty, ISTA); evaluation uses whole splits.
        val_fraction: share of the rows held out for validation.
        test_fraction: share held out for the final test.
        seed: seed of the split (and of the synthetic problem).
        n_samples, n_features, n_informative, noise: the synthetic problem (ignored otherwise).
    """

    def __init__(
        self,
        name: str = "digits",
        batch_size: int | None = 64,
        val_fraction: float = 0.2,
        test_fraction: float = 0.2,
        seed: int = 0,
        n_samples: int = 600,
        n_features: int = 50,
        n_informative: int = 5,
        noise: float = 0.5,
    ) -> None:
        super().__init__()
        check_tabular(name, batch_size, val_fraction, test_fraction, n_features, n_informative)
        self.name, self.batch_size, self.seed = name, batch_size, seed
        self.fractions = (val_fraction, test_fraction)
        self.synthetic = dict(n_samples=n_samples, n_features=n_features, n_informative=n_informative, noise=noise)
        self.splits: dict[str, TensorDataset] = {}
        self.true_support: np.ndarray | None = None
        self.task = "regression" if name in ("diabetes", "synthetic") else "classification"
        self._load()

    def _load(self) -> None:
        # Loading is cheap (bundled files, <2k rows), so it happens at construction: the model's
        # sizes are known before the Trainer starts, on every rank, without a download step.
        if self.name == "synthetic":
            x, y, self.true_support = sparse_linear_problem(**self.synthetic, seed=self.seed)
        else:
            import sklearn.datasets

            bunch = getattr(sklearn.datasets, SKLEARN_SETS[self.name][0])()
            x, y = bunch.data.astype(np.float64), bunch.target
        parts = split_indices(len(x), *self.fractions, seed=self.seed)
        xs = standardize(*(x[i] for i in parts))
        if self.task == "regression":
            ys = [torch.tensor(a, dtype=torch.float32).unsqueeze(1) for a in standardize(*(y[i] for i in parts))]
        else:
            ys = [torch.tensor(y[i], dtype=torch.long) for i in parts]
        for stage, xa, ya in zip(("train", "val", "test"), xs, ys, strict=True):
            self.splits[stage] = TensorDataset(torch.tensor(xa, dtype=torch.float32), ya)
        self.num_features = x.shape[1]
        self.num_outputs = int(y.max()) + 1 if self.task == "classification" else 1
        self.input_shape = (1, 8, 8) if self.name == "digits" else (self.num_features,)

    def describe(self) -> dict[str, Any]:
        """The sizes a model needs: ``task``, ``in_features``, ``num_outputs``, ``input_shape``."""
        return dict(task=self.task, in_features=self.num_features, num_outputs=self.num_outputs, input_shape=self.input_shape)

    @property
    def train_batch_size(self) -> int:
        return self.batch_size or len(self.splits["train"])

    @property
    def train_batches(self) -> int:
        """Training batches per epoch (the last one may be partial)."""
        return math.ceil(len(self.splits["train"]) / self.train_batch_size)

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.splits["train"], batch_size=self.train_batch_size, shuffle=True, generator=generator)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.splits["val"], batch_size=len(self.splits["val"]))

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.splits["test"], batch_size=len(self.splits["test"]))
