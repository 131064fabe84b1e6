"""The ``WeightMonitor`` callback: per-layer norms and sparsity of the weights, logged every n steps."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from lightreg.base.checks import check_int, check_patterns, check_real, check_tensor_kind
from lightreg.base.wrapped import is_uninitialized
from lightreg.base.distributed import is_dtensor, local_shards, shard_reduction
from lightreg.stats.histogram import histograms
from lightreg.callbacks.loggers import log_scalars, wandb_loggers
from lightreg.model.selection import Owned, effective_tensor, select_rows
from lightreg.model.masked import Masked
from lightreg.stats.figures import EXTRAS, figure_names, figures, global_sparsity, partial_sums
from lightreg.callbacks.step_hooks import StepHooks
from lightreg.callbacks.strategies import check_fit


def check_extras(extras: object) -> tuple[str, ...]:
    """Normalise ``extras``: a name or a sequence of names from ``EXTRAS``, in ``EXTRAS`` order."""
    if isinstance(extras, str):
        extras = (extras,)
    if not isinstance(extras, Sequence):
        raise TypeError(f"extras must be a sequence of names from {EXTRAS}, got {extras!r}")
    for extra in extras:
        if extra not in EXTRAS:
            raise ValueError(f"extras must hold names from {EXTRAS}, got {extra!r} in {list(extras)!r}")
    return tuple(e for e in EXTRAS if e in extras)


class WeightMonitor(Callback):
    """Log ``weights/<name>/l1``, ``/l2``, ``/sparsity`` and ``weights/global/sparsity`` every n steps.

    ``l1 = Σ|w|``, ``l2 = √Σw²``, ``sparsity = #(w == 0) / numel`` per monitored tensor, and the global
    sparsity over all of them. ``extras`` adds ``/near_zero`` (``#(|w| <= eps) / numel``), ``/linf``
    (``max|w|``) and, with ``"structured"``, ``/dead_rows`` and ``/dead_cols``: the fraction of all-zero
    slices along dim 0 (output units, filters) and dim 1 (input features, channels) of tensors with
    ``ndim >= 2``.

    When: after the optimizer steps whose ``trainer.global_step`` (steps done) is a multiple of
    ``every_n_steps``, in ``on_train_batch_end`` of the batch that stepped (never on accumulation
    micro-batches, nor when the AMP scaler skipped the step). Optimizers created during the fit
    (``trainer.strategy.setup_optimizers()``) are hooked at the next ``on_train_batch_start``. A proximal ``Regularizer`` acts in the
    optimizer's step post-hook, so the figures are after the prox whichever callback comes first.
    The row carries Lightning's step for that batch (``global_step - 1``), the same row as the module's
    own ``self.log`` values. Nothing is computed on the steps in between; a logging step computes
    everything in one pass and crosses to the host once. Never on the progress bar.

    Selection is the ``Regularizer``'s (``ndim >= 2``, no norm layers; ``include``/``exclude`` globs);
    a lazy layer's weight joins once it materialises. A layer pruned with ``torch.nn.utils.prune`` (or
    Lightning's ``ModelPruning``) is measured as the weight it computes with, ``weight_orig * weight_mask``,
    under its own name ``weight``.
    Under DDP the replicated weights are measured on rank zero only; with ``DTensor`` parameters (FSDP2)
    every rank computes its shard's partial sums and they are reduced before the figures are formed.

    With a ``WandbLogger`` attached, fit end also logs ``weights/table`` (one row per layer) and sets the
    run summary ``weights/global/sparsity``; ``histogram_every_n_steps`` adds ``weights/<name>/hist``.
    ``print_table=True`` prints ``sparsity_report`` at fit end on rank zero.

    Example:
        >>> WeightMonitor(every_n_steps=10, extras=["structured", "linf"])
        WeightMonitor(every_n_steps=10, include=None, exclude=None, extras=('linf', 'structured'))
    """

    def __init__(
        self,
        every_n_steps: int = 50,
        include: Sequence[str] | str | None = None,
        exclude: Sequence[str] | str | None = None,
        extras: Sequence[str] = (),
        eps: float = 1e-8,
        histogram_every_n_steps: int | None = None,
        print_table: bool = False,
    ) -> None:
        self.every_n_steps = check_int("every_n_steps", every_n_steps, low=1)
        self.include = check_patterns("include", include)
        self.exclude = check_patterns("exclude", exclude)
        self.extras = check_extras(extras)
        self.eps = check_real("eps", eps)
        if histogram_every_n_steps is not None:
            check_int("histogram_every_n_steps", histogram_every_n_steps, low=1)
        self.histogram_every_n_steps = histogram_every_n_steps
        if not isinstance(print_table, bool):
            raise TypeError(f"print_table must be a bool, got {print_table!r}")
        self.print_table = print_table
        self.names: list[str] = []
        self._rows: list[Owned] = []
        self._lazy: list[Tensor] = []
        self._module: pl.LightningModule | None = None
        self._sharded = False
        self._stepped = False
        self._hooks = StepHooks()
        self._wandb: Any = None

    def __repr__(self) -> str:
        return (
            f"WeightMonitor(every_n_steps={self.every_n_steps}, include={self.include!r}, "
            f"exclude={self.exclude!r}, extras={self.extras!r})"
        )

    @property
    def params(self) -> list[Tensor | Masked]:
        """The monitored tensors as the model computes with them now (a pruned weight as ``orig * mask``)."""
        if self._lazy and not any(is_uninitialized(p) for p in self._lazy) and self._module is not None:
            self._select(self._module)  # the lazy layers have materialised: decide their parameters now
        return [effective_tensor(row) for row in self._rows]

    def _select(self, pl_module: pl.LightningModule) -> None:
        self._rows = select_rows(pl_module, self.include, self.exclude)
        for row in self._rows:
            if not is_uninitialized(row.param):
                check_tensor_kind(row.name, row.param, "WeightMonitor")
        self.names = [row.name for row in self._rows]
        self._lazy = [p for p in pl_module.parameters() if is_uninitialized(p)]
        self._module = pl_module

    # ---- pure part ----------------------------------------------------------------------------
    @torch.no_grad()
    def compute(self, extras: Sequence[str] | None = None) -> tuple[Tensor, Tensor]:
        """``(figures, partial sums)`` of the monitored tensors; every rank must call it when sharded."""
        extras = self.extras if extras is None else extras
        params = self.params
        partials = partial_sums(
            local_shards(params), eps=self.eps, near_zero="near_zero" in extras, linf="linf" in extras,
            structured="structured" in extras, reduce=shard_reduction(params, self.names),
        )
        return figures(partials, extras=extras), partials

    def metrics(self) -> dict[str, float]:
        """The metric dict of one logging step, with one device-to-host transfer."""
        table, partials = self.compute()
        names = figure_names(self.extras)
        values = torch.cat([table.flatten(), global_sparsity(partials).reshape(1)]).tolist()
        out: dict[str, float] = {}
        for i, (param_name, row) in enumerate(zip(self.names, self._rows, strict=True)):
            for j, figure in enumerate(names):
                if figure in ("dead_rows", "dead_cols") and row.param.ndim < 2:
                    continue
                out[f"weights/{param_name}/{figure}"] = values[i * len(names) + j]
        out["weights/global/sparsity"] = values[-1]
        return out

    # ---- Lightning hooks ----------------------------------------------------------------------
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        check_fit(trainer.strategy, pl_module, "WeightMonitor", read_only=True)
        self._select(pl_module)
        self._sharded = any(is_dtensor(row.param) for row in self._rows)
        self._stepped = False
        self._wandb = None
        if wandb_loggers(trainer):
            import lightreg.callbacks.wandb_extras as wandb_extras  # only now: the core never imports wandb

            self._wandb = wandb_extras
        self._hooks.remove()
        self._hooks = StepHooks(post=[self._post_step_hook])  # the hook as the instance has it now
        self._hooks.hook_all(trainer.optimizers)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self._hooks.hook_all(trainer.optimizers)  # setup_optimizers() mid-fit makes new ones

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        stepped, self._stepped = self._stepped, False
        if not stepped or not trainer.loggers:
            return
        # DDP: the replicas are identical, rank zero measures alone; sharded: every rank joins the reduction.
        measure = self._sharded or trainer.is_global_zero
        if measure and trainer.global_step % self.every_n_steps == 0:
            values = self.metrics()
            if trainer.is_global_zero:
                log_scalars(trainer, values)
        hist = self.histogram_every_n_steps
        if hist and self._wandb is not None and measure and trainer.global_step % hist == 0:
            tensors = [t.materialize() if isinstance(t, Masked) else t for t in self.params]
            hists = histograms(local_shards(tensors), reduce=shard_reduction(tensors, self.names))
            self._wandb.log_histograms(trainer, self.names, hists)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not (self.print_table or self._wandb is not None):
            return
        if not (self._sharded or trainer.is_global_zero):
            return
        from lightreg.stats.report import print_report, report_rows

        rows = report_rows(self.names, self.params)
        if not trainer.is_global_zero:
            return
        if self.print_table:
            print_report(rows)
        if self._wandb is not None:
            self._wandb.log_fit_end(trainer, rows)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._hooks.remove()

    def _post_step_hook(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        # Fires once per real step (not per micro-batch), after any proximal Regularizer hook that
        # was registered earlier; the figures themselves wait for on_train_batch_end, after all of them.
        self._stepped = True

