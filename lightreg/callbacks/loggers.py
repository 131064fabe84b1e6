"""The callbacks' side of Lightning's loggers: when a batch is a log step, its step number, the attached
``WandbLogger``s, and scalar tensors written to every logger in one host transfer.

Like Lightning's ``LearningRateMonitor``, callbacks here write through ``logger.log_metrics`` rather
than ``LightningModule.log``: no per-metric ``.item()``, no collective, no progress-bar entry, and the
step numbers line up with the module's own ``self.log`` rows.
"""

from __future__ import annotations

from collections.abc import Mapping

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import WandbLogger
from torch import Tensor


def is_log_step(trainer: pl.Trainer) -> bool:
    """True on the training batches where Lightning writes ``self.log`` values (``log_every_n_steps``)."""
    if not trainer.loggers:
        return False
    return bool(trainer._logger_connector.should_update_logs)


def logger_step(trainer: pl.Trainer) -> int:
    """The step number Lightning gives the current training batch's logged row."""
    return trainer.fit_loop.epoch_loop._batches_that_stepped


def wandb_loggers(trainer: pl.Trainer) -> list[WandbLogger]:
    """The attached ``WandbLogger``s; checking costs nothing, Lightning imports wandb only when a run starts."""
    return [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]


def to_floats(metrics: Mapping[str, Tensor | float]) -> dict[str, float]:
    """Convert scalar tensors to floats with one device-to-host copy for the whole mapping."""
    names = list(metrics)
    tensors = [v for v in metrics.values() if isinstance(v, Tensor)]
    if not tensors:
        return {k: float(v) for k, v in metrics.items()}  # type: ignore[arg-type]
    device = tensors[0].device
    dtype = torch.float32 if device.type == "mps" else torch.float64
    stacked = torch.stack(
        [v.detach().reshape(()).to(device, dtype) if isinstance(v, Tensor) else torch.tensor(v, device=device, dtype=dtype)
         for v in metrics.values()]
    )
    return dict(zip(names, stacked.tolist(), strict=True))


def log_scalars(trainer: pl.Trainer, metrics: Mapping[str, Tensor | float], step: int | None = None) -> dict[str, float]:
    """Write ``metrics`` to every attached logger at ``step`` (default: the current batch's row)."""
    values = to_floats(metrics)
    step = logger_step(trainer) if step is None else step
    for logger in trainer.loggers:
        logger.log_metrics(values, step=step)
    return values
