"""Optimizer step hooks for a callback: every optimizer of a fit hooked once, new ones as they appear."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from lightreg.base.wrapped import unwrap
from lightreg.proximal.step_registry import base_optimizer as inner_optimizer

#: ``hook(optimizer, args, kwargs)``, as ``Optimizer.register_step_pre_hook``/``register_step_post_hook`` call it.
StepHook = Callable[[torch.optim.Optimizer, Any, Any], None]


class StepHooks:
    """Register step pre- and post-hooks on each optimizer once; a ``LightningOptimizer`` is unwrapped first.

    The hooks fire only when a step really runs: once per step under gradient accumulation, never when the
    AMP scaler skips one. Optimizers made during the fit (``trainer.strategy.setup_optimizers()``) are
    hooked by the next :meth:`hook_all`, which costs one dict lookup per optimizer.

    Args:
        post: the step post-hooks, in order.
        pre: the step pre-hooks, in order.
        on_new: called with each new optimizer before it is hooked (to refuse it before its first step).

    Example:
        >>> steps = []
        >>> hooks = StepHooks(post=[lambda opt, args, kwargs: steps.append(1)])
        >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)
        >>> hooks.hook_all([opt, opt]); opt.step(); steps
        [1]
        >>> hooks.remove(); opt.step(); steps, hooks.optimizers
        ([1], [])
    """

    def __init__(self, post: Sequence[StepHook] = (), pre: Sequence[StepHook] = (),
                 on_new: Callable[[torch.optim.Optimizer], Any] | None = None) -> None:
        self.post, self.pre, self.on_new = list(post), list(pre), on_new
        self.handles: list[Any] = []
        self._hooked: dict[int, torch.optim.Optimizer] = {}

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        """The optimizers hooked so far, in order."""
        return list(self._hooked.values())

    def hook(self, optimizer: torch.optim.Optimizer) -> None:
        """Hook ``optimizer`` unless it already is."""
        optimizer = unwrap(optimizer)
        if not hasattr(optimizer, "_optimizer_step_post_hooks"):  # a wrapper that skipped Optimizer.__init__
            optimizer = inner_optimizer(optimizer)
        if self._hooked.get(id(optimizer)) is optimizer:
            return
        if self.on_new is not None:
            self.on_new(optimizer)
        self._hooked[id(optimizer)] = optimizer
        self.handles += [optimizer.register_step_pre_hook(h) for h in self.pre]
        self.handles += [optimizer.register_step_post_hook(h) for h in self.post]

    def hook_all(self, optimizers: Iterable[torch.optim.Optimizer]) -> None:
        """Hook each of ``optimizers`` that is not hooked yet."""
        for optimizer in optimizers:
            self.hook(optimizer)

    def remove(self, forget: bool = True) -> None:
        """Remove every hook; ``forget=False`` keeps :attr:`optimizers` (what the fit used) but hooks nothing again."""
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        if forget:
            self._hooked.clear()
        else:
            self.pre, self.post = [], []
