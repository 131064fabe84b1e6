"""What a wrapped or lazy torch object is underneath: the optimizer a ``LightningOptimizer`` wraps, a lazy
module's parameter that has no shape yet. Plain torch, used by the model, step-rule and callback layers."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def unwrap(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer itself: a ``LightningOptimizer`` wraps the real one.

    Example:
        >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1); unwrap(opt) is opt
        True
    """
    return getattr(optimizer, "_optimizer", optimizer)


def is_uninitialized(param: Tensor) -> bool:
    """Whether ``param`` is a lazy module's ``UninitializedParameter`` (no shape until the first forward).

    Example:
        >>> is_uninitialized(torch.nn.LazyLinear(2).weight), is_uninitialized(torch.nn.Linear(2, 2).weight)
        (True, False)
    """
    return isinstance(param, torch.nn.parameter.UninitializedTensorMixin)
