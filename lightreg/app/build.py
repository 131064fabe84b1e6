"""Turn the composed config into objects: data, model, Regularizer, callbacks, logger and Trainer.

Two config nodes hold two kinds of keys side by side, so that overrides stay flat
(``penalty.alpha=1e-3 penalty.mode=gradient``): ``penalty`` = a penalty ``_target_`` with its own
arguments plus the ``Regularizer`` keys; ``strategy`` = a Lightning strategy ``_target_`` with its own
arguments plus the ``Trainer`` keys ``accelerator``, ``devices``, ``num_nodes``.

Every node is checked against the signature of what it builds before it is built
(:mod:`lightreg.app.validate`): a wrong key or a value of the wrong type stops the run here, not
inside ``fit``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from hydra.utils import get_class, instantiate
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, OmegaConf

from lightreg import Regularizer, select_parameters
from lightreg.app.config import ConfigError, RunContext
from lightreg.app.data import TabularData
from lightreg.app.feature_map import FeatureMap
from lightreg.app.progress import EpochLines
from lightreg.app.tracking import build_logger
from lightreg.app.validate import check_arguments

REGULARIZER_KEYS = ("mode", "include", "exclude", "schedule", "name", "preconditioned", "target_sparsity", "target_ramp",
                    "target_debias")
TRAINER_KEYS = ("accelerator", "devices", "num_nodes")
#: Logger rows every this many optimizer steps, or once per epoch when an epoch is shorter.
LOG_EVERY_N_STEPS = 10


@dataclass
class Job:
    """Everything a run builds from its config before training starts."""

    data: TabularData
    model: pl.LightningModule
    regularizer: Regularizer | None
    logger: Logger | None
    trainer: pl.Trainer


def _container(node: DictConfig) -> dict[str, Any]:
    out = OmegaConf.to_container(node, resolve=True, throw_on_missing=True)
    assert isinstance(out, dict)
    return out


def build_target(node: DictConfig, where: str, drop: tuple[str, ...] = (), **extra: Any) -> Any:
    """``instantiate(node, **extra)`` without the keys ``drop``, after checking the node's keys and values
    against its ``_target_``'s signature."""
    kwargs = {k: v for k, v in _container(node).items() if k not in drop}
    target = kwargs.pop("_target_")
    check_arguments(get_class(target), kwargs, where)
    return instantiate({"_target_": target, **kwargs}, **extra, _convert_="all")


#: Keys of the ``data`` node that are not TabularData's: defaults for other nodes (``epochs``: trainer.max_epochs).
DATA_HINTS = ("epochs",)


def build_data(cfg: DictConfig) -> TabularData:
    return build_target(cfg.data, "data", drop=DATA_HINTS)


def build_model(cfg: DictConfig, data: TabularData) -> pl.LightningModule:
    """The model, sized by the data (``task``, ``in_features``, ``num_outputs``, ``input_shape``)."""
    return build_target(cfg.model, "model", **data.describe())


def build_regularizer(node: DictConfig | None) -> Regularizer | None:
    """``Regularizer(penalty, mode, include, exclude, schedule, ...)`` from a ``penalty`` node; ``None`` for
    ``penalty=none``. Keys left at ``null`` take the ``Regularizer``'s defaults.

    Example:
        >>> build_regularizer(OmegaConf.create({"_target_": "lightreg.L1", "alpha": 0.1, "mode": "gradient"}))
        Regularizer(L1(alpha=0.1), mode='gradient', include=None, exclude=None, schedule=None, name='l1')
        >>> build_regularizer(OmegaConf.create({"_target_": "lightreg.L0", "alpha": 0.0, "target_sparsity": 0.9}))
        Regularizer(L0(alpha=0.0), mode='proximal', include=None, exclude=None, schedule=None, name='l0', target_sparsity=0.9)
    """
    if node is None or node.get("_target_") is None:
        return None
    kwargs = _container(node)
    kwargs.pop("log10_alpha", None)  # already folded into alpha by the lightreg.alpha resolver
    reg_kwargs = {k: kwargs.pop(k) for k in REGULARIZER_KEYS if k in kwargs}
    reg_kwargs = {k: v for k, v in reg_kwargs.items() if v is not None}  # null: the Regularizer's default
    if reg_kwargs.get("schedule") is not None:
        reg_kwargs["schedule"] = instantiate(reg_kwargs["schedule"], _convert_="all")
    return Regularizer(instantiate(kwargs, _convert_="all"), **reg_kwargs)


def check_selection(model: pl.LightningModule, regularizer: Regularizer | None, monitor: Any) -> None:
    """Resolve the penalty's and the monitor's globs on the model now, so a typo stops the run before any
    process, logger run or checkpoint is started (the callbacks would raise the same error at fit start)."""
    if regularizer is not None:
        for name, param in regularizer.select(model):
            regularizer.penalty.check_tensor(name, param)
    if monitor:
        select_parameters(model, monitor.get("include"), monitor.get("exclude"))


def build_strategy(node: DictConfig) -> dict[str, Any]:
    """``Trainer`` keyword arguments (``accelerator``, ``devices``, ``num_nodes``, ``strategy``)."""
    kwargs = _container(node)
    trainer_kwargs = {k: kwargs.pop(k) for k in TRAINER_KEYS if k in kwargs}
    target = kwargs.pop("_target_", None)
    if target is None:
        trainer_kwargs["strategy"] = kwargs.get("name", "auto")
        return trainer_kwargs
    check_arguments(get_class(target), kwargs, "strategy")
    trainer_kwargs["strategy"] = instantiate({"_target_": target, **kwargs}, _convert_="all")
    return trainer_kwargs


class FitResults(Callback):
    """Puts what the fit ends with into ``trainer.callback_metrics``: the last step and epoch, and the
    ``Regularizer``'s metrics (``reg/<name>/penalty``, ``/alpha``).

    Lightning sends ``callback_metrics`` back from a spawned rank 0 (``start_method=spawn``), but neither
    the trainer's counters nor the callbacks' state: read afterwards in the main process, those would be
    the ones of a callback that never ran. ``trainer/epoch`` counts from 0, as the checkpoint names do
    (``epoch=14-step=255.ckpt`` after 15 epochs); ``trainer/global_step`` counts optimizer steps.
    """

    def __init__(self, regularizer: Regularizer | None = None) -> None:
        self.regularizer = regularizer

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        results = {"trainer/global_step": trainer.global_step, "trainer/epoch": trainer.current_epoch - 1}
        if self.regularizer is not None:  # a collective under FSDP2: every rank gets here
            results.update(self.regularizer.metrics())
        trainer.callback_metrics.update({k: torch.as_tensor(v, dtype=torch.float64).cpu() for k, v in results.items()})


def build_callbacks(cfg: DictConfig, ctx: RunContext, regularizer: Regularizer | None,
                    max_epochs: int | None = None) -> list[Callback]:
    callbacks: list[Callback] = [] if regularizer is None else [regularizer]
    callbacks.append(FitResults(regularizer))
    if cfg.get("monitor") is not None and cfg.monitor.get("_target_"):
        callbacks.append(build_target(cfg.monitor, "monitor"))
    if cfg.checkpoint.enabled:
        ckpt = _container(cfg.checkpoint)
        ckpt.pop("enabled")
        save_last = ckpt.pop("save_last", False)
        check_arguments(ModelCheckpoint, ckpt, "checkpoint")
        dirpath = ctx.output_dir / "checkpoints"
        callbacks.append(ModelCheckpoint(dirpath=dirpath, **ckpt))
        if save_last:
            # Lightning's own save_last only refreshes last.ckpt when a new best is saved; this one
            # overwrites it at every epoch end, so it always holds the weights metrics.json describes.
            callbacks.append(ModelCheckpoint(dirpath=dirpath, filename="last", monitor=None, save_top_k=1,
                                             save_on_train_epoch_end=True, enable_version_counter=False))
    if cfg.get("freeze_zeros") is not None and cfg.freeze_zeros.get("_target_"):
        callbacks.append(instantiate(cfg.freeze_zeros))
    if cfg.data.get("name") == "digits":  # which pixels the first layer still reads, drawn at fit end
        callbacks.append(FeatureMap(ctx.output_dir / "feature_map.png"))
    if cfg.progress_bar:
        # A redrawn bar on a terminal; one line per epoch in a file, a pipe or CI.
        tty = sys.stdout.isatty()
        callbacks.append(TQDMProgressBar(refresh_rate=cfg.progress_refresh_rate) if tty
                         else EpochLines.for_epochs(max_epochs))
    return callbacks


def log_every_n_steps(batches_per_epoch: int, limit: int | float | None = None) -> int:
    """``LOG_EVERY_N_STEPS``, or fewer when an epoch has fewer batches (Lightning warns about those).

    Example:
        >>> log_every_n_steps(9), log_every_n_steps(1), log_every_n_steps(100), log_every_n_steps(100, limit=3)
        (9, 1, 10, 3)
    """
    if isinstance(limit, int) and not isinstance(limit, bool):
        batches_per_epoch = min(batches_per_epoch, limit)
    elif isinstance(limit, float):
        batches_per_epoch = int(batches_per_epoch * limit)
    return max(1, min(LOG_EVERY_N_STEPS, batches_per_epoch))


def trainer_kwargs(cfg: DictConfig, data: TabularData | None = None) -> dict[str, Any]:
    """The ``Trainer``'s keyword arguments from ``trainer`` and ``strategy``, checked against its signature."""
    kwargs = _container(cfg.trainer)
    if kwargs.get("log_every_n_steps") is None and data is not None:
        kwargs["log_every_n_steps"] = log_every_n_steps(data.train_batches, kwargs.get("limit_train_batches"))
    check_arguments(pl.Trainer, kwargs, "trainer")
    kwargs.update(build_strategy(cfg.strategy))
    kwargs["enable_progress_bar"] = bool(cfg.progress_bar)
    kwargs["enable_checkpointing"] = bool(cfg.checkpoint.enabled)
    return kwargs


def check_launch(trainer: pl.Trainer, ctx: RunContext) -> None:
    """Refuse a multirun whose strategy re-launches the command line in each rank.

    Lightning's subprocess launcher (``ddp``, ``ModelParallelStrategy``) starts ranks 1..N-1 by
    re-running ``sys.argv``; from ``lightreg-train -m`` that is the whole sweep again in every rank
    (Hydra #2070, Lightning #15737). ``start_method=spawn`` forks the ranks from inside the job
    instead, and a SLURM launcher starts the ranks itself.
    """
    from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

    launcher = getattr(trainer.strategy, "launcher", None)
    if (
        ctx.multirun
        and isinstance(launcher, _SubprocessScriptLauncher)
        and launcher.num_processes > 1
        and not launcher.cluster_environment.creates_processes_externally
    ):
        raise ConfigError(
            f"strategy {type(trainer.strategy).__name__} re-launches the command line in every rank, which in a "
            "multirun (-m) re-runs the whole sweep per rank (Hydra #2070). Use strategy.start_method=spawn "
            "(strategy=ddp_cpu or ddp), run the jobs one by one without -m, or use hydra/launcher=slurm."
        )


def build_job(cfg: DictConfig, ctx: RunContext) -> Job:
    """Build the run: every config check happens here, before any process, W&B run or checkpoint starts."""
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)  # every ??? and ${...} fails here, first
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    data = build_data(cfg)
    model = build_model(cfg, data)
    regularizer = build_regularizer(cfg.penalty)
    check_selection(model, regularizer, cfg.get("monitor") or {})
    kwargs = trainer_kwargs(cfg, data)
    callbacks = build_callbacks(cfg, ctx, regularizer, kwargs.get("max_epochs"))
    logger = build_logger(cfg.logger, cfg, ctx)
    try:
        trainer = pl.Trainer(**kwargs, callbacks=callbacks, logger=logger if logger is not None else False,
                             default_root_dir=str(ctx.output_dir))
    except (MisconfigurationException, ValueError, TypeError) as err:  # e.g. a GPU strategy without a GPU
        raise ConfigError(f"strategy={ctx.choices.get('strategy', '?')} (accelerator={kwargs.get('accelerator')}): {err}") from err
    check_launch(trainer, ctx)
    return Job(data=data, model=model, regularizer=regularizer, logger=logger, trainer=trainer)
