"""W&B-only extras of the ``WeightMonitor``: the per-layer table, the run summary and weight histograms,
formatted for W&B from what the monitor computed.

Imported by the monitor only when a ``WandbLogger`` is attached, so ``import lightreg`` never imports
``wandb``. Everything goes through the attached loggers' own runs (offline mode included).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import wandb

from lightreg.callbacks.loggers import logger_step, wandb_loggers
from lightreg.stats.report import REPORT_COLUMNS, overall_sparsity


def table_data(rows: Sequence[dict[str, Any]]) -> list[list[Any]]:
    """Report rows as ``wandb.Table`` data; the shape becomes a string such as ``"16x8"``."""
    return [[("x".join(map(str, r["shape"])) if c == "shape" else r[c]) for c in REPORT_COLUMNS] for r in rows]


def log_fit_end(trainer: pl.Trainer, rows: Sequence[dict[str, Any]]) -> None:
    """Log ``weights/table`` (one row per layer) and set the summary ``weights/global/sparsity``."""
    sparsity = overall_sparsity(rows)
    for logger in wandb_loggers(trainer):
        table = wandb.Table(columns=list(REPORT_COLUMNS), data=table_data(rows))
        logger.log_metrics({"weights/table": table}, step=logger_step(trainer))  # type: ignore[dict-item]
        logger.experiment.summary["weights/global/sparsity"] = sparsity


def log_histograms(trainer: pl.Trainer, names: Sequence[str], hists: Sequence[tuple[list[float], list[float]]]) -> None:
    """Log ``weights/<name>/hist`` (a ``wandb.Histogram`` of ``(counts, edges)``, from
    ``lightreg.stats.histogram.histograms``) for every monitored tensor, from rank zero."""
    if not trainer.is_global_zero:
        return
    values = {f"weights/{n}/hist": wandb.Histogram(np_histogram=(c, e)) for n, (c, e) in zip(names, hists, strict=True)}
    for logger in wandb_loggers(trainer):
        logger.log_metrics(values, step=logger_step(trainer))  # type: ignore[arg-type]
