"""The run's callbacks: the ``callbacks`` config group, the app's result collection, the feature map, the progress."""

from __future__ import annotations

import sys

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, TQDMProgressBar
from omegaconf import DictConfig

from lightreg import Regularizer
from lightreg.app.config import RunContext
from lightreg.app.feature_map import FeatureMap
from lightreg.app.progress import EpochLines
from lightreg.app.targets import _callable, build_target


class FitResults(Callback):
    """Puts what the fit ends with into ``trainer.callback_metrics``: the last step and epoch, and the
    ``Regularizer``'s metrics (``reg/<name>/penalty``, ``/alpha``).

    Lightning sends ``callback_metrics`` back from a spawned rank 0 (``start_method=spawn``), but neither
    the trainer's counters nor the callbacks' state: read afterwards in the main process, those would be
    the ones of a callback that never ran. ``trainer/epoch`` counts from 0, as the checkpoint names do
    (``epoch=14-step=255.ckpt`` after 15 epochs); ``trainer/global_step`` counts optimizer steps.
    """

    def __init__(self, regularizer: Regularizer | None = None) -> None:
        self.regularizer = regularizer

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        results = {"trainer/global_step": trainer.global_step, "trainer/epoch": trainer.current_epoch - 1}
        if self.regularizer is not None:  # a collective under FSDP2: every rank gets here
            results.update(self.regularizer.metrics())
        trainer.callback_metrics.update({k: torch.as_tensor(v, dtype=torch.float64).cpu() for k, v in results.items()})


def build_callbacks(cfg: DictConfig, ctx: RunContext, regularizer: Regularizer | None,
                    max_epochs: int | None = None) -> list[Callback]:
    """The Regularizer, every node of the ``callbacks`` group that has a ``_target_`` (in the group's order), the
    digits feature map and the progress output. A ``ModelCheckpoint`` without ``dirpath`` writes into
    ``<output dir>/checkpoints``."""
    callbacks: list[Callback] = [] if regularizer is None else [regularizer]
    callbacks.append(FitResults(regularizer))
    for key, node in (cfg.get("callbacks") or {}).items():
        if not isinstance(node, DictConfig) or node.get("_target_") is None:
            continue  # a callback switched off with `callbacks.<key>=null`
        extra = {}
        if issubclass(_callable(node._target_), ModelCheckpoint) and node.get("dirpath") is None:
            extra["dirpath"] = str(ctx.output_dir / "checkpoints")
        callbacks.append(build_target(node, f"callbacks.{key}", drop=tuple(extra), **extra))
    if cfg.data.get("name") == "digits":  # which pixels the first layer still reads, drawn at fit end
        callbacks.append(FeatureMap(ctx.output_dir / "feature_map.png"))
    if cfg.progress_bar:
        # A redrawn bar on a terminal; one line per epoch in a file, a pipe or CI.
        tty = sys.stdout.isatty()
        callbacks.append(TQDMProgressBar(refresh_rate=cfg.progress_refresh_rate) if tty
                         else EpochLines.for_epochs(max_epochs))
    return callbacks
