"""Turn the composed config into objects: data, model, Regularizer, callbacks and Trainer arguments.

Two config nodes hold two kinds of keys side by side, so that overrides stay flat
(``penalty.alpha=1e-3 penalty.mode=gradient``): ``penalty`` = a penalty ``_target_`` with its own
arguments plus the ``Regularizer`` keys; ``strategy`` = a Lightning strategy ``_target_`` with its own
arguments plus the ``Trainer`` keys ``accelerator``, ``devices``, ``num_nodes``.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import lightning.pytorch as pl
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, TQDMProgressBar
from omegaconf import DictConfig, OmegaConf

from lightreg import Regularizer, select_parameters
from lightreg.app.config import ConfigError, RunContext
from lightreg.app.data import TabularData
from lightreg.app.feature_map import FeatureMap

REGULARIZER_KEYS = ("mode", "include", "exclude", "schedule", "name", "preconditioned", "target_sparsity", "target_ramp",
                    "target_debias")
TRAINER_KEYS = ("accelerator", "devices", "num_nodes")


def _container(node: DictConfig) -> dict[str, Any]:
    out = OmegaConf.to_container(node, resolve=True, throw_on_missing=True)
    assert isinstance(out, dict)
    return out


def build_data(cfg: DictConfig) -> TabularData:
    return instantiate(cfg.data)


def build_model(cfg: DictConfig, data: TabularData) -> pl.LightningModule:
    """The model, sized by the data (``task``, ``in_features``, ``num_outputs``, ``input_shape``)."""
    return instantiate(cfg.model, **data.describe())


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
        reg_kwargs["schedule"] = instantiate(reg_kwargs["schedule"])
    return Regularizer(instantiate(kwargs), **reg_kwargs)


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
    requires = kwargs.pop("requires", None)
    if requires and importlib.util.find_spec(requires) is None:
        raise ConfigError(
            f"this strategy needs the {requires!r} package, which is not installed: pip install 'lightreg[{requires}]'"
        )
    trainer_kwargs["strategy"] = instantiate(kwargs) if kwargs.get("_target_") else kwargs.get("name", "auto")
    return trainer_kwargs


def build_callbacks(cfg: DictConfig, ctx: RunContext, regularizer: Regularizer | None) -> list[Callback]:
    callbacks: list[Callback] = [] if regularizer is None else [regularizer]
    if cfg.get("monitor") is not None and cfg.monitor.get("_target_"):
        callbacks.append(instantiate(cfg.monitor))
    if cfg.checkpoint.enabled:
        ckpt = _container(cfg.checkpoint)
        ckpt.pop("enabled")
        save_last = ckpt.pop("save_last", False)
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
        callbacks.append(TQDMProgressBar(refresh_rate=cfg.get("progress_refresh_rate", 5)))
    return callbacks


def trainer_kwargs(cfg: DictConfig) -> dict[str, Any]:
    kwargs = _container(cfg.trainer)
    kwargs.update(build_strategy(cfg.strategy))
    kwargs["enable_progress_bar"] = bool(cfg.progress_bar)
    kwargs["enable_checkpointing"] = bool(cfg.checkpoint.enabled)
    return kwargs


def check_launch(trainer: pl.Trainer, ctx: RunContext) -> None:
    """Refuse a multirun whose strategy re-launches the command line in each rank.

    Lightning's subprocess launcher (``ddp``, ``fsdp``, ``deepspeed``, ``ModelParallelStrategy``) starts
    ranks 1..N-1 by re-running ``sys.argv``; from ``lightreg-train -m`` that is the whole sweep again in
    every rank (Hydra #2070, Lightning #15737). ``start_method=spawn`` forks the ranks from inside the
    job instead, and a SLURM launcher starts the ranks itself.
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
