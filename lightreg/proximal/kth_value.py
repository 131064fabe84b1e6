"""The k-th smallest value over many tensors, exactly, without concatenating them (radix selection).

``torch.kthvalue`` over a concatenation of every penalised tensor would need a temporary the size of the
whole model. Non-negative floats order like their bit patterns read as integers, so the k-th value can be
found digit by digit instead: a histogram of the top 16 bits over all tensors (65536 counters) names the
bin that holds the k-th value; a second histogram, of the next 16 bits among the values in that bin, names
the next digit; and so on (2 passes for float32, 4 for float64). Each pass reads every tensor once, one
tensor at a time, and adds its counts (``index_add_`` on accelerators: no host sync per tensor); the counts are summed
across the ranks of a sharded model by ``reduce``. The result is exact, ties included.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import Tensor

from lightreg.base.distributed import ShardReduction  # sums a histogram across ranks (FSDP2); _identity elsewhere

DIGIT_BITS = 16
BINS = 1 << DIGIT_BITS
_INT = {torch.float32: torch.int32, torch.float64: torch.int64}

#: A function returning fresh tensors of non-negative values (each pass calls it again and may overwrite them).
Levels = Callable[[], Iterable[Tensor]]


def _identity(hist: Tensor) -> Tensor:
    return hist


def _histogram(levels: Levels, dtype: torch.dtype, shift: int, prefix: int, reduce: ShardReduction) -> Tensor:
    """Counts of digit ``(bits >> shift) & 0xFFFF`` among values whose higher bits equal ``prefix``."""
    hist: Tensor | None = None
    width = torch.finfo(dtype).bits
    lo = prefix << (shift + DIGIT_BITS)
    for x in levels():
        bits = x.detach().to(dtype).reshape(-1).view(_INT[dtype])  # x is a fresh temporary: reuse it
        bits = bits.bitwise_and_((1 << (width - 1)) - 1)  # -0.0 and +0.0 alike
        # (bits - lo) >> shift is the digit for the values under the prefix, negative below it, >= BINS above it.
        digits = bits.sub_(lo).bitwise_right_shift_(shift)
        if shift + DIGIT_BITS < width:  # after the first digit: values outside the prefix go to an extra bin, dropped
            digits.masked_fill_(digits < 0, BINS).clamp_(max=BINS)
        if hist is None:
            hist = torch.zeros(BINS + 1, dtype=torch.int64, device=x.device)
        if x.device.type == "cpu":  # bincount is faster on CPU; on an accelerator it syncs to size its output
            hist += torch.bincount(digits, minlength=BINS + 1)
        else:
            hist.index_add_(0, digits, torch.ones((), dtype=torch.int64, device=x.device).expand(len(digits)))
        del x, bits, digits  # before the generator makes the next tensor's levels
    if hist is None:
        hist = torch.zeros(BINS + 1, dtype=torch.int64)
    return reduce(hist)[:BINS]


def _select(levels: Levels, rank: Callable[[int], int], dtype: torch.dtype, reduce: ShardReduction) -> float | None:
    """The ``rank(n)``-th smallest of the ``n`` values (``None`` for rank 0), one histogram pass per digit."""
    width = torch.finfo(dtype).bits
    prefix = remaining = 0
    for shift in range(width - DIGIT_BITS, -1, -DIGIT_BITS):
        counts = _histogram(levels, dtype, shift, prefix, reduce).cumsum_(0)
        if prefix == 0 and shift == width - DIGIT_BITS:
            n = int(counts[-1])
            remaining = rank(n)
            if remaining == 0:
                return None
            if not 1 <= remaining <= n:
                raise ValueError(f"k must be in [1, {n}] (the number of values), got {remaining}")
        digit = int(torch.searchsorted(counts, torch.tensor(remaining, device=counts.device)))
        remaining -= int(counts[digit - 1]) if digit else 0
        prefix = (prefix << DIGIT_BITS) | digit
        del counts  # before the next pass allocates its own
    return torch.tensor(prefix, dtype=_INT[dtype]).view(dtype).item()


def kth_smallest(levels: Levels, k: int, dtype: torch.dtype = torch.float32, reduce: ShardReduction = _identity) -> float:
    """The ``k``-th smallest (1-based) of all the values ``levels()`` yields, read in ``dtype``.

    Args:
        levels: returns an iterable of tensors of values >= 0; called once per 16-bit digit.
        k: the rank, 1 <= k <= the number of values.
        dtype: float32 or float64, the precision of the comparison.
        reduce: sums a histogram across ranks (identity on one process).

    Example:
        >>> parts = [torch.tensor([5.0, 0.5, 3.0]), torch.tensor([2.0, 0.0])]
        >>> kth_smallest(lambda: (p.clone() for p in parts), 3)
        2.0
    """
    value = _select(levels, lambda n: k, dtype, reduce)
    if value is None:
        raise ValueError(f"k must be >= 1, got {k}")
    return value


def level_for_fraction(
    levels: Levels, fraction: float, dtype: torch.dtype = torch.float32, reduce: ShardReduction = _identity
) -> float:
    """The smallest ``alpha`` with ``round(fraction * n)`` of the ``n`` values at most ``alpha`` (ties add more).

    The k-th value is nudged up by one unit in the last place, so that a prox that compares a recomputed
    product (``|w| <= alpha * t``) against it still zeroes the k-th entry. ``0.0`` when no value must go.

    Example:
        >>> level_for_fraction(lambda: [torch.tensor([4.0, 1.0, 3.0, 2.0])], 0.5) > 2.0
        True
    """
    return level_for_rank(levels, lambda n: int(math.floor(fraction * n + 0.5)), dtype, reduce)


def level_for_rank(levels: Levels, rank: Callable[[int], int], dtype: torch.dtype = torch.float32,
                   reduce: ShardReduction = _identity) -> float:
    """The ``rank(n)``-th smallest of the ``n`` values nudged up by one unit in the last place (as in
    ``level_for_fraction``), ``0.0`` for rank 0: the level that zeroes the ``rank(n)`` units of lowest level.

    Example:
        >>> level_for_rank(lambda: [torch.tensor([4.0, 1.0, 3.0, 2.0])], lambda n: n - 1) > 3.0
        True
    """
    value = _select(levels, rank, dtype, reduce)
    if value is None:
        return 0.0
    nudged = torch.nextafter(torch.tensor(value, dtype=dtype), torch.tensor(math.inf, dtype=dtype))
    return nudged.item()
