"""A pruned layer's effective weight, ``orig * mask``, as the model computes with it (``torch.nn.utils.prune``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Masked:
    """``orig * mask``: a pruned layer's effective weight, formed only when its statistics are computed.

    ``torch.nn.utils.prune`` keeps the parameter as ``weight_orig`` and the module computes with
    ``weight_orig * weight_mask``; statistics of that product are what the model really uses. Forming
    it one tensor at a time keeps the temporaries at the size of the largest tensor.

    Example:
        >>> m = Masked(torch.tensor([[1.0, -2.0]]), torch.tensor([[0.0, 1.0]]))
        >>> m.shape, m.numel(), m.materialize()
        (torch.Size([1, 2]), 2, tensor([[ 0., -2.]]))
    """

    orig: Tensor
    mask: Tensor

    @property
    def shape(self) -> torch.Size:
        return self.orig.shape

    @property
    def ndim(self) -> int:
        return self.orig.ndim

    @property
    def dtype(self) -> torch.dtype:
        return self.orig.dtype

    @property
    def device(self) -> torch.device:
        return self.orig.device

    def numel(self) -> int:
        return self.orig.numel()

    def materialize(self) -> Tensor:
        return self.orig.detach() * self.mask
