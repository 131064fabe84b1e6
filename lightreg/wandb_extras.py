"""W&B-only extras of the ``WeightMonitor``: the per-layer table, the run summary and weight histograms.

Imported by the monitor only when a ``WandbLogger`` is attached, so ``import lightreg`` never imports
``wandb``. Everything goes through the attached loggers' own runs (offline mode included).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import wandb
from torch import Tensor

from lightreg.distributed import is_dtensor, local_tensor
from lightreg.loggers import logger_step, wandb_loggers
from lightreg.report import REPORT_COLUMNS, overall_sparsity
from lightreg.statistics import counted_here

HISTOGRAM_BINS = 64


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


def _histc_input(p: Tensor) -> Tensor:
    w = local_tensor(p).detach()
    # histc has no bfloat16/float16 kernel everywhere: those take a one-tensor float32 copy.
    return w if w.dtype in (torch.float32, torch.float64) else w.float()


@torch.no_grad()
def histograms(
    params: Sequence[Tensor], names: Sequence[str] | None = None, bins: int = HISTOGRAM_BINS
) -> list[tuple[list[float], list[float]]]:
    """``(counts, edges)`` per tensor over its whole ``[min, max]`` (widened by 1 when flat).

    With ``DTensor`` shards (every rank must call it) the range is all-reduced first (MAX) and the
    counts after (SUM, each element counted once), so a histogram is never a shard's own. Two host
    transfers for all tensors: the ranges, then the counts.

    Example:
        >>> counts, edges = histograms([torch.tensor([0.0, 0.0, 1.0])], bins=2)[0]
        >>> counts, edges
        ([2.0, 1.0], [0.0, 0.5, 1.0])
    """
    names = list(names) if names is not None else [str(i) for i in range(len(params))]
    plain = [_histc_input(p) for p in params]
    sharded = any(is_dtensor(p) for p in params) and torch.distributed.is_initialized()
    device = plain[0].device
    ends = torch.full((len(plain), 2), -math.inf, dtype=torch.float64, device=device)  # [-min, max]
    for i, w in enumerate(plain):
        if w.numel():
            lo, hi = torch.aminmax(w)
            ends[i, 0], ends[i, 1] = -lo, hi
    if sharded:
        torch.distributed.all_reduce(ends, op=torch.distributed.ReduceOp.MAX)
    ranges = []
    for neg_lo, hi in ends.tolist():
        lo = -neg_lo if math.isfinite(neg_lo) else 0.0
        hi = hi if math.isfinite(hi) else 0.0
        ranges.append((lo - 1, hi + 1) if lo == hi else (lo, hi))
    counts = torch.stack(
        [torch.histc(w, bins=bins, min=lo, max=hi).double() for w, (lo, hi) in zip(plain, ranges, strict=True)]
    )
    if sharded:
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        counted = [counted_here(n, p, rank, world) for n, p in zip(names, params, strict=True)]
        counts *= torch.tensor(counted, dtype=torch.float64, device=device)[:, None]
        torch.distributed.all_reduce(counts, op=torch.distributed.ReduceOp.SUM)
    return [
        (row, [lo + (hi - lo) * i / bins for i in range(bins + 1)])
        for row, (lo, hi) in zip(counts.tolist(), ranges, strict=True)
    ]


def log_histograms(trainer: pl.Trainer, names: Sequence[str], params: Sequence[Tensor]) -> None:
    """Log ``weights/<name>/hist`` (a ``wandb.Histogram``) for every monitored tensor, from rank zero.

    Every rank must call it when some parameters are ``DTensor`` shards.
    """
    hists = histograms(params, names)
    if not trainer.is_global_zero:
        return
    values = {f"weights/{n}/hist": wandb.Histogram(np_histogram=(c, e)) for n, (c, e) in zip(names, hists, strict=True)}
    for logger in wandb_loggers(trainer):
        logger.log_metrics(values, step=logger_step(trainer))  # type: ignore[arg-type]
