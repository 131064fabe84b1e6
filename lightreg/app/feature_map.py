"""The feature map: which of the 8x8 digit pixels the first layer still reads, drawn as a PNG.

A column group lasso on the first layer (``penalty=group_lasso penalty.dim=1``) zeroes whole columns of
its weight; pixel ``j`` is *used* when column ``j`` has any non-zero. The map shows each pixel's column
norm ``||W[:, j]||_2`` and crosses out the unused ones. The app draws it at fit end for digits runs
(``feature_map.png`` in the run directory, and a W&B image when a ``WandbLogger`` is attached);
``scripts/feature_map.py`` draws it from a checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from lightreg.base.distributed import global_value
from lightreg.callbacks.loggers import log_scalars, wandb_loggers

DIGITS_SHAPE = (8, 8)


def used_features(weight: Tensor) -> Tensor:
    """``True`` for each input (column of the ``(out, in)`` weight) with any non-zero entry.

    Example:
        >>> used_features(torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 2.0]])).tolist()
        [False, True, True]
    """
    return (weight.detach() != 0).any(dim=0)


def draw_feature_map(weight: Tensor, path: str | Path, shape: Sequence[int] = DIGITS_SHAPE, title: str | None = None) -> Path:
    """Draw the input pixels that the first layer's ``(out, H*W)`` weight reads, as a PNG at ``path``.

    Colour: the column norm ``||W[:, j]||_2``; unused pixels (all-zero column) are white with a cross.
    Uses matplotlib's Agg canvas directly: no pyplot state, no display needed.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    weight = weight.detach().double().cpu()
    h, w = shape
    if weight.ndim != 2 or weight.shape[1] != h * w:
        raise ValueError(f"weight must be (out, {h * w}) for a {h}x{w} map, got shape {tuple(weight.shape)}")
    used = used_features(weight).view(h, w)
    norms = torch.linalg.vector_norm(weight, dim=0).view(h, w).numpy()
    fig = Figure(figsize=(3.6, 3.4), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(np.ma.masked_where(~used.numpy(), norms), cmap="viridis", vmin=0.0)
    image.cmap.set_bad("white")
    for i, j in (~used).nonzero().tolist():
        ax.text(j, i, "×", ha="center", va="center", color="0.55", fontsize=11)
    ax.set_xticks(range(w))
    ax.set_yticks(range(h))
    ax.tick_params(labelsize=6)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="column norm")
    ax.set_title(title or f"pixels in use: {int(used.sum())} of {h * w}", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    return path


def first_layer(module: nn.Module) -> nn.Module | None:
    """The first ``Linear`` or ``Conv2d`` in ``module``, in registration order."""
    return next((m for m in module.modules() if isinstance(m, (nn.Linear, nn.Conv2d))), None)


class FeatureMap(Callback):
    """At fit end, draw the feature map of the model's first ``Linear`` (over ``H*W`` inputs) to ``path``.

    Logs it as a W&B image (``key``) to each attached ``WandbLogger``, and ``features/used`` /
    ``features/total`` to every logger. A model whose first layer is not such a ``Linear`` (the CNN)
    is skipped with a message.
    """

    def __init__(self, path: str | Path, shape: Sequence[int] = DIGITS_SHAPE, key: str = "feature_map") -> None:
        self.path, self.shape, self.key = Path(path), tuple(shape), key
        self.used: int | None = None

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        layer = first_layer(pl_module)
        if not isinstance(layer, nn.Linear) or layer.in_features != self.shape[0] * self.shape[1]:
            rank_zero_info(f"feature map skipped: the first layer is {layer}, not a Linear over {self.shape} pixels")
            return
        weight = global_value(layer.weight.detach())  # a collective under FSDP2: every rank takes part
        self.used = int(used_features(weight).sum())
        if not trainer.is_global_zero:
            return
        draw_feature_map(weight, self.path, self.shape)
        log_scalars(trainer, {"features/used": float(self.used), "features/total": float(weight.shape[1])},
                    step=trainer.global_step)
        for logger in wandb_loggers(trainer):
            logger.log_image(key=self.key, images=[str(self.path)], caption=[f"{self.used} of {weight.shape[1]} pixels in use"])
        rank_zero_info(f"feature map ({self.used} of {weight.shape[1]} pixels in use): {self.path}")
