"""``shrink(..., drop_inputs=True)``: cut the input features (or channels) the first weight layer never reads.

An input whose column of the first layer is all zero (a ``Linear`` column, or a ``Conv2d`` input channel)
changes nothing downstream, so the shrunk model can go without it: it takes ``x[:, kept_inputs]``. The
modules before the first layer must act per input: elementwise ones, dropout, batch norm, pooling of
image channels, and one ``Unflatten(1, (C, H, W))`` turning flat pixels into the first conv's channels
(then ``kept_inputs`` lists flat indices, the ``H*W`` pixels of each kept channel).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lightreg.surgery.plan import ELEMENTWISE, NORMS, POOLS, Named, Plan, slice_norm


@dataclass
class InputCut:
    """The inputs along dim 1 still read by the first layer, and the modules before it to slice with them."""

    first: nn.Module
    prefix: list[Named]
    alive: Tensor
    unflatten: nn.Unflatten | None

    @classmethod
    def of(cls, plan: Plan) -> InputCut:
        """Check the modules before the first layer; ``TypeError``/``ValueError`` naming one it cannot follow."""
        first_name, first = plan.layers[0]
        channels = first.in_channels if isinstance(first, nn.Conv2d) else first.in_features
        unflatten = [m for _, m in plan.prefix if isinstance(m, nn.Unflatten)]
        if len(unflatten) > 1 or (unflatten and isinstance(first, nn.Linear)):
            raise ValueError(f"drop_inputs=True follows at most one Unflatten, and only before a Conv2d; "
                             f"found {len(unflatten)} before {first_name!r}")
        spatial = isinstance(first, nn.Conv2d) and not unflatten
        width = channels
        if unflatten:
            u = unflatten[0]
            if u.dim != 1 or len(u.unflattened_size) != 3 or u.unflattened_size[0] != channels:
                raise ValueError(f"drop_inputs=True needs Unflatten(1, ({channels}, H, W)) before {first_name!r}, got {u}")
            width = channels * u.unflattened_size[1] * u.unflattened_size[2]
        for name, m in plan.prefix:
            if isinstance(m, nn.Unflatten):
                spatial, width = True, channels
            elif isinstance(m, NORMS):
                if m.num_features != width or isinstance(m, nn.BatchNorm2d) != spatial:
                    raise ValueError(f"drop_inputs=True: {name!r} ({m}) does not act on the {width} inputs here")
            elif not (isinstance(m, ELEMENTWISE) or (spatial and isinstance(m, POOLS))):
                raise TypeError(f"drop_inputs=True: shrink cannot follow {name!r} ({type(m).__name__}) before the "
                                f"first layer {first_name!r}; it follows elementwise modules, Dropout, BatchNorm, "
                                "pooling and one Unflatten(1, (C, H, W))")
        alive = torch.ones(channels, dtype=torch.bool, device=first.weight.device)
        return cls(first, list(plan.prefix), alive, unflatten[0] if unflatten else None)

    def cut(self, layer) -> bool:
        """Drop the inputs whose columns of the first layer are all zero (keeping one); whether any went."""
        cols = layer.columns(self.alive.numel())
        dead = self.alive & ~(cols != 0).any(2).any(0)
        if not dead.any():
            return False
        if bool((dead == self.alive).all()):  # no input is read: keep one so that the shapes stay valid
            dead[int(dead.nonzero()[0])] = False
            if not dead.any():
                return False
        self.alive &= ~dead
        return True

    def pixels(self) -> int:
        return 1 if self.unflatten is None else self.unflatten.unflattened_size[1] * self.unflatten.unflattened_size[2]

    def flat_alive(self) -> Tensor:
        """The kept entries of the flat input (each kept channel's ``H*W`` pixels after an ``Unflatten``)."""
        return self.alive.repeat_interleave(self.pixels())

    def kept_inputs(self) -> tuple[int, ...]:
        """Indices along dim 1 of the original input that the shrunk model takes, in order."""
        return tuple(int(i) for i in self.flat_alive().nonzero().flatten())

    def rebuild(self) -> None:
        """Slice the batch norms before the first layer and narrow the ``Unflatten``."""
        keep = self.flat_alive()
        for _, m in self.prefix:
            if isinstance(m, nn.Unflatten):
                m.unflattened_size = (int(self.alive.sum()), *m.unflattened_size[1:])
                keep = self.alive
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                slice_norm(m, keep)
