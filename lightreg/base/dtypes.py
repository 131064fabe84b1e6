"""The one rule for the dtype a sum is accumulated in, used by the penalties, the step rules and the statistics."""

from __future__ import annotations

import torch
from torch import Tensor


def accumulation_dtype(w: Tensor) -> torch.dtype:
    """The dtype a sum over ``w`` is accumulated in: float32 for 16-bit floats (whose max is 65504).

    Example:
        >>> accumulation_dtype(torch.zeros(2, dtype=torch.float16))
        torch.float32
    """
    return torch.float32 if w.dtype in (torch.float16, torch.bfloat16) else w.dtype
