"""``FreezeZeros``: keep the exact zeros of a selection at zero while training goes on without a penalty.

Once a penalty has zeroed weights (or whole units, before or after ``shrink``), fine-tuning without it
would move them off zero: gradients, momentum, Adam's moments and weight decay all reach them. This
callback records the zero pattern ``M = (w == 0)`` of its selection once, then at every real step

* masks the gradient, ``g[M] = 0`` (``on_before_optimizer_step``): no momentum or moment builds up there;
* re-zeroes the weights, ``w[M] = 0``, right after the step (``optimizer.register_step_post_hook``):
  whatever the optimizer still adds there (weight decay, state carried in from before) is undone.

Every other entry trains exactly as in a run that zeroed ``w[M]`` by hand after each step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from lightreg.base.checks import check_int, check_patterns
from lightreg.base.distributed import is_dtensor
from lightreg.model.selection import named_parameters_with_owner, select_parameters
from lightreg.callbacks.step_hooks import StepHooks
from lightreg.callbacks.strategies import check_fit


class FreezeZeros(Callback):
    """Keep every entry that is exactly zero in the selected parameters at zero, through any optimizer.

    The pattern is recorded at the first fit start, or at optimizer step ``start_step`` of the fit (prune,
    then fine-tune in one run: a penalty on until that step, ``StepWindow(end=start_step)``), or by
    ``record(module)`` beforehand. It is kept by later fits with this instance and in checkpoints (its
    ``state_dict``): a resumed run freezes the same entries. To let them train again, leave the callback
    out of the next fit, or call ``release()``.

    Args:
        include: glob(s) on parameter names; replaces the default rule (``ndim >= 2``, no norm layers).
        exclude: glob(s) removed from the selection.
        start_step: the ``trainer.global_step`` at which to record the pattern and start holding it.
        name: the checkpoint key; give stacked instances distinct names.

    Example:
        >>> model = nn.Linear(3, 2, bias=False)
        >>> _ = model.weight.data.copy_(torch.tensor([[0.0, 1.0, 2.0], [3.0, 0.0, 0.0]]))
        >>> freeze = FreezeZeros()
        >>> freeze.record(model); freeze.frozen
        {'weight': 3}
    """

    def __init__(
        self,
        include: Sequence[str] | str | None = None,
        exclude: Sequence[str] | str | None = None,
        start_step: int = 0,
        name: str = "freeze_zeros",
    ) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty string, got {name!r}")
        self.include = check_patterns("include", include)
        self.exclude = check_patterns("exclude", exclude)
        self.start_step = check_int("start_step", start_step, low=0)
        self.name = name
        self.masks: dict[str, Tensor] = {}  # w == 0 (masked_fill_); TargetSparsity keeps w != 0
        self._pairs: list[tuple[Tensor, Tensor]] = []
        self._hooks = StepHooks()
        self._waiting = False

    def __repr__(self) -> str:
        return (f"FreezeZeros(include={self.include!r}, exclude={self.exclude!r}, start_step={self.start_step}, "
                f"name={self.name!r})")

    @property
    def state_key(self) -> str:
        return self._generate_state_key(name=self.name)

    @property
    def frozen(self) -> dict[str, int]:
        """How many entries of each parameter are held at zero."""
        return {name: int(mask.sum()) for name, mask in self.masks.items()}

    @property
    def hooked(self) -> list[torch.optim.Optimizer]:
        """The optimizers whose steps this callback is hooked into now (none before fit start and after the fit)."""
        return self._hooks.optimizers if self._hooks.handles else []

    @property
    def held(self) -> list[tuple[Tensor, Tensor]]:
        """The ``(parameter, mask)`` pairs held at zero now, the masks on their parameters' devices."""
        return list(self._pairs)

    @torch.no_grad()
    def record(self, module: nn.Module) -> None:
        """Record ``w == 0`` of the selected parameters of ``module`` now (replacing any earlier pattern)."""
        self.masks = {name: param.detach() == 0 for name, param in select_parameters(module, self.include, self.exclude)}

    def release(self) -> None:
        """Forget the pattern and stop acting, from the next step on; the next fit records afresh."""
        self._remove_hooks()
        self.masks = {}
        self._waiting = False

    # ---- Lightning hooks ------------------------------------------------------------------------
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        check_fit(trainer.strategy, pl_module, f"FreezeZeros {self.name!r}")
        select_parameters(pl_module, self.include, self.exclude)  # a typo fails now, not at start_step
        self._waiting = not self.masks and trainer.global_step < self.start_step
        if not self._waiting:
            self._start(trainer, pl_module)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if self._waiting and trainer.global_step >= self.start_step:
            self._waiting = False
            self._start(trainer, pl_module)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        self.mask_gradients()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_hooks()

    def state_dict(self) -> dict[str, Any]:
        return {"masks": {name: mask.cpu() for name, mask in self.masks.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.masks = dict(state_dict["masks"])

    # ---- the two operations -----------------------------------------------------------------------
    @torch.no_grad()
    def mask_gradients(self) -> None:
        """``g[M] = 0`` for every bound parameter that has a gradient."""
        for param, mask in self._pairs:
            if param.grad is not None:
                param.grad.masked_fill_(mask, 0.0)

    @torch.no_grad()
    def zero_weights(self) -> None:
        """``w[M] = 0`` for every bound parameter."""
        for param, mask in self._pairs:
            param.masked_fill_(mask, 0.0)

    # ---- helpers ----------------------------------------------------------------------------------
    def _start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.masks:
            self.record(pl_module)
        self._remove_hooks()
        self._pairs = self._bind(pl_module)
        self.zero_weights()  # a pattern loaded from elsewhere holds from the first step
        self._hooks = StepHooks(post=[self._post_step_hook])
        self._hooks.hook_all(trainer.optimizers)
        total = sum(self.frozen.values())
        rank_zero_info(f"FreezeZeros {self.name!r} from step {trainer.global_step}: {total:,} entries held at zero "
                       f"in {len(self.masks)} tensors")

    def _bind(self, pl_module: nn.Module) -> list[tuple[Tensor, Tensor]]:
        params = {row.name: row.param for row in named_parameters_with_owner(pl_module)}
        pairs = []
        for name, mask in self.masks.items():
            param = params.get(name)
            if param is None or param.shape != mask.shape:
                found = "no such parameter" if param is None else f"shape {tuple(param.shape)}"
                raise ValueError(f"FreezeZeros {self.name!r} holds a mask for {name!r} of shape {tuple(mask.shape)}, "
                                 f"but the model has {found}")
            if is_dtensor(param):
                raise TypeError(f"FreezeZeros {self.name!r}: {name!r} is a sharded DTensor (FSDP2), which it does not support")
            pairs.append((param, mask.to(param.device)))
        return pairs

    def _post_step_hook(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.zero_weights()

    def _remove_hooks(self) -> None:
        self._hooks.remove()
        self._pairs = []
