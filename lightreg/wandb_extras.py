"""W&B-only extras of the ``WeightMonitor``: the per-layer table, the run summary and weight histograms.

Imported by the monitor only when a ``WandbLogger`` is attached, so ``import lightreg`` never imports
``wandb``. Everything goes through the attached loggers' own runs (offline mode included).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import wandb
from lightning.pytorch.loggers import WandbLogger
from torch import Tensor

from lightreg.emit import logger_step
from lightreg.report import REPORT_COLUMNS

HISTOGRAM_BINS = 64


def _loggers(trainer: pl.Trainer) -> list[WandbLogger]:
    return [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]


def table_data(rows: Sequence[dict[str, Any]]) -> list[list[Any]]:
    """Report rows as ``wandb.Table`` data; the shape becomes a string such as ``"16x8"``."""
    return [[("x".join(map(str, r["shape"])) if c == "shape" else r[c]) for c in REPORT_COLUMNS] for r in rows]


def overall_sparsity(rows: Sequence[dict[str, Any]]) -> float:
    """``Σ #zeros / Σ numel`` over the rows (each row's zero count is an exact integer after rounding)."""
    numel = sum(r["numel"] for r in rows)
    return sum(round(r["sparsity"] * r["numel"]) for r in rows) / numel


def log_fit_end(trainer: pl.Trainer, rows: Sequence[dict[str, Any]]) -> None:
    """Log ``weights/table`` (one row per layer) and set the summary ``weights/global/sparsity``."""
    sparsity = overall_sparsity(rows)
    for logger in _loggers(trainer):
        table = wandb.Table(columns=list(REPORT_COLUMNS), data=table_data(rows))
        logger.log_metrics({"weights/table": table}, step=logger_step(trainer))  # type: ignore[dict-item]
        logger.experiment.summary["weights/global/sparsity"] = sparsity


@torch.no_grad()
def histograms(params: Sequence[Tensor], bins: int = HISTOGRAM_BINS) -> list[tuple[list[float], list[float]]]:
    """``(counts, edges)`` per tensor over its own ``[min, max]``, with one host transfer for all.

    Example:
        >>> counts, edges = histograms([torch.tensor([0.0, 0.0, 1.0])], bins=2)[0]
        >>> counts, edges
        ([2.0, 1.0], [0.0, 0.5, 1.0])
    """
    stacked = []
    for p in params:
        w = p.detach().float()  # histc has no float64/bfloat16 kernel everywhere; one tensor-sized copy
        lo, hi = torch.aminmax(w)
        # histc with min == max == 0 bins over the data's own range (widened by 1 when flat), as below.
        stacked.append(torch.cat([torch.histc(w, bins=bins, min=0, max=0), lo.reshape(1), hi.reshape(1)]))
    out = []
    for values in torch.stack(stacked).tolist():
        counts, lo, hi = values[:bins], values[bins], values[bins + 1]
        if lo == hi:
            lo, hi = lo - 1, hi + 1
        out.append((counts, [lo + (hi - lo) * i / bins for i in range(bins + 1)]))
    return out


def log_histograms(trainer: pl.Trainer, names: Sequence[str], params: Sequence[Tensor]) -> None:
    """Log ``weights/<name>/hist`` (a ``wandb.Histogram``) for every monitored tensor."""
    hists = {
        f"weights/{name}/hist": wandb.Histogram(np_histogram=(counts, edges))
        for name, (counts, edges) in zip(names, histograms(params), strict=True)
    }
    for logger in _loggers(trainer):
        logger.log_metrics(hists, step=logger_step(trainer))  # type: ignore[arg-type]
