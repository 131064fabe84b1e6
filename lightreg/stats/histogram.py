"""Weight histograms as plain tensor functions: each tensor's counts over its whole ``[min, max]``."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from lightreg.base.distributed import ShardReduction

HISTOGRAM_BINS = 64


def _histc_input(w: Tensor) -> Tensor:
    w = w.detach()
    # histc has no bfloat16/float16 kernel everywhere: those take a one-tensor float32 copy.
    return w if w.dtype in (torch.float32, torch.float64) else w.float()


@torch.no_grad()
def histograms(
    tensors: Sequence[Tensor], bins: int = HISTOGRAM_BINS, reduce: ShardReduction | None = None
) -> list[tuple[list[float], list[float]]]:
    """``(counts, edges)`` per tensor over its whole ``[min, max]`` (widened by 1 when flat).

    With ``reduce`` (``lightreg.base.distributed.shard_reduction``) ``tensors`` are this rank's local shards and
    every rank must call it: the range is the max over the ranks first, the counts the sum after (each
    element counted once), so a histogram is never a shard's own. Two host transfers for all tensors: the
    ranges, then the counts.

    Example:
        >>> counts, edges = histograms([torch.tensor([0.0, 0.0, 1.0])], bins=2)[0]
        >>> counts, edges
        ([2.0, 1.0], [0.0, 0.5, 1.0])
    """
    plain = [_histc_input(w) for w in tensors]
    device = plain[0].device
    ends = torch.full((len(plain), 2), -math.inf, dtype=torch.float64, device=device)  # [-min, max]
    for i, w in enumerate(plain):
        if w.numel():
            lo, hi = torch.aminmax(w)
            ends[i, 0], ends[i, 1] = -lo, hi
    if reduce is not None:
        reduce(ends, "max")
    ranges = []
    for neg_lo, hi in ends.tolist():
        lo = -neg_lo if math.isfinite(neg_lo) else 0.0
        hi = hi if math.isfinite(hi) else 0.0
        ranges.append((lo - 1, hi + 1) if lo == hi else (lo, hi))
    counts = torch.stack(
        [torch.histc(w, bins=bins, min=lo, max=hi).double() for w, (lo, hi) in zip(plain, ranges, strict=True)]
    )
    if reduce is not None:
        counts = reduce(counts * reduce.weights(device)[:, None])
    return [
        (row, [lo + (hi - lo) * i / bins for i in range(bins + 1)])
        for row, (lo, hi) in zip(counts.tolist(), ranges, strict=True)
    ]
