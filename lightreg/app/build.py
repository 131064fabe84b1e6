"""Turn the composed config into objects: data, model, Regularizer, callbacks, logger and Trainer.

Any LightningModule and LightningDataModule are built from their ``_target_``. The data's sizes reach the model
through an optional contract: a DataModule may define ``describe()`` (a dict such as ``{"in_features": 64,
"num_outputs": 10}``), and the model receives each of those entries that its ``__init__`` names and the config
leaves unset. A model that names none of them, or data without ``describe()``, is built from its config alone.

Two config nodes hold two kinds of keys side by side, so that overrides stay flat
(``penalty.alpha=1e-3 penalty.mode=gradient``): ``penalty`` = a penalty ``_target_`` with its own arguments plus
the ``Regularizer``'s arguments (the keys its signature names: :func:`regularizer_keys`); ``strategy`` = a
Lightning strategy ``_target_`` with its own arguments plus the ``Trainer`` keys ``accelerator``, ``devices``,
``num_nodes``. Callbacks are the ``callbacks`` group: every node in it with a ``_target_`` is built.

Every node is checked against the signature of what it builds before it is built
(:mod:`lightreg.app.validate`): a wrong key or a value of the wrong type stops the run here, not inside ``fit``.
The command line has run the same checks before torch loaded (:mod:`lightreg.app.preflight`).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
from hydra.utils import get_class, instantiate
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, OmegaConf

from lightreg import Regularizer, WeightMonitor, select_parameters
from lightreg.app.config import ConfigError, RunContext
from lightreg.app.callbacks import build_callbacks
from lightreg.app.targets import _callable, _container, build_target
from lightreg.app.tracking import build_logger
from lightreg.app.validate import check_arguments, parameters

TRAINER_KEYS = ("accelerator", "devices", "num_nodes")
#: Keys of the ``data`` node that are the app's, not the DataModule's: ``epochs`` is the default of trainer.max_epochs.
DATA_HINTS = ("epochs",)
#: Keys of the ``penalty`` node that are the app's: ``log10_alpha`` is folded into ``alpha`` by a resolver.
PENALTY_HINTS = ("log10_alpha",)
#: Logger rows every this many optimizer steps, or once per epoch when an epoch is shorter.
LOG_EVERY_N_STEPS = 10


def regularizer_keys() -> tuple[str, ...]:
    """The ``Regularizer``'s arguments besides the penalty, read from its signature: every one is a ``penalty.`` key.

    Example:
        >>> "target_every" in regularizer_keys() and "penalty" not in regularizer_keys()
        True
    """
    return tuple(name for name in inspect.signature(Regularizer.__init__).parameters if name not in ("self", "penalty"))


@dataclass
class Job:
    """Everything a run builds from its config before training starts."""

    data: pl.LightningDataModule
    model: pl.LightningModule
    regularizer: Regularizer | None
    logger: Logger | None
    trainer: pl.Trainer


def build_data(cfg: DictConfig) -> pl.LightningDataModule:
    return build_target(cfg.data, "data", drop=DATA_HINTS)


def data_sizes(model_target: Any, data: Any, configured: Any) -> dict[str, Any]:
    """What the data offers (``data.describe()``) that the model asks for (names in its ``__init__``) and the
    config leaves unset.

    Example:
        >>> class Data:
        ...     def describe(self): return {"in_features": 4, "num_outputs": 3, "task": "classification"}
        >>> class Net:
        ...     def __init__(self, in_features: int, num_outputs: int = 2, depth: int = 1): ...
        >>> data_sizes(Net, Data(), {"num_outputs": 5})
        {'in_features': 4}
    """
    offered = getattr(data, "describe", None)
    if not callable(offered):
        return {}
    wanted, _ = parameters(model_target)
    return {k: v for k, v in offered().items() if k in wanted and k not in configured}


def build_model(cfg: DictConfig, data: Any) -> pl.LightningModule:
    """The model from ``cfg.model``, given the data's sizes it asks for (:func:`data_sizes`)."""
    target = _callable(cfg.model._target_)
    return build_target(cfg.model, "model", **data_sizes(target, data, cfg.model))


def split_penalty(node: DictConfig | dict) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(penalty kwargs with _target_, Regularizer kwargs)`` of a ``penalty`` node; the Regularizer's are the keys
    its signature names, the app's own hints are dropped, and ``null`` Regularizer keys are left to its defaults."""
    kwargs = _container(node) if isinstance(node, DictConfig) else dict(node)
    for key in PENALTY_HINTS:
        kwargs.pop(key, None)
    names = regularizer_keys()
    reg_kwargs = {k: kwargs.pop(k) for k in names if k in kwargs}
    return kwargs, {k: v for k, v in reg_kwargs.items() if v is not None}


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
    penalty_kwargs, reg_kwargs = split_penalty(node)
    target = penalty_kwargs.pop("_target_")
    check_arguments(get_class(target), penalty_kwargs, "penalty")
    check_arguments(Regularizer, reg_kwargs, "penalty")
    if reg_kwargs.get("schedule") is not None:
        reg_kwargs["schedule"] = instantiate(reg_kwargs["schedule"], _convert_="all")
    return Regularizer(instantiate({"_target_": target, **penalty_kwargs}, _convert_="all"), **reg_kwargs)


def check_selection(model: pl.LightningModule, regularizer: Regularizer | None, callbacks: list[Callback]) -> None:
    """Resolve the penalty's and the monitors' globs on the model now, so a typo stops the run before any
    process, logger run or checkpoint is started (the callbacks would raise the same error at fit start)."""
    if regularizer is not None:
        for name, param in regularizer.select(model):
            regularizer.penalty.check_tensor(name, param)
    for monitor in callbacks:
        if isinstance(monitor, WeightMonitor):
            select_parameters(model, monitor.include, monitor.exclude)


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


def train_batches(data: Any) -> int | None:
    """Training batches per epoch: the data's ``train_batches``, else the length of a ``train_dataloader()`` that
    can be built before ``setup`` (many can), else ``None`` (unknown: an iterable stream, data that needs setup)."""
    if data is None:
        return None
    known = getattr(data, "train_batches", None)
    if isinstance(known, int):
        return known
    try:
        return len(data.train_dataloader())
    except Exception:  # noqa: BLE001 - any failure only means "unknown"; Lightning builds the loader itself later
        return None


def trainer_kwargs(cfg: DictConfig, data: Any = None) -> dict[str, Any]:
    """The ``Trainer``'s keyword arguments from ``trainer`` and ``strategy``, checked against its signature. When an
    epoch's batches are known (:func:`train_batches`), logger rows come at least once per epoch."""
    kwargs = _container(cfg.trainer)
    batches = train_batches(data)
    if kwargs.get("log_every_n_steps") is None:
        kwargs["log_every_n_steps"] = log_every_n_steps(batches, kwargs.get("limit_train_batches")) if batches else LOG_EVERY_N_STEPS
    check_arguments(pl.Trainer, kwargs, "trainer")
    kwargs.update(build_strategy(cfg.strategy))
    kwargs["enable_progress_bar"] = bool(cfg.progress_bar)
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
    kwargs = trainer_kwargs(cfg, data)
    callbacks = build_callbacks(cfg, ctx, regularizer, kwargs.get("max_epochs"))
    check_selection(model, regularizer, callbacks)
    kwargs["enable_checkpointing"] = any(isinstance(c, ModelCheckpoint) for c in callbacks)
    logger = build_logger(cfg.logger, cfg, ctx)
    try:
        trainer = pl.Trainer(**kwargs, callbacks=callbacks, logger=logger if logger is not None else False,
                             default_root_dir=str(ctx.output_dir))
    except (MisconfigurationException, ValueError, TypeError) as err:  # e.g. a GPU strategy without a GPU
        raise ConfigError(f"strategy={ctx.choices.get('strategy', '?')} (accelerator={kwargs.get('accelerator')}): {err}") from err
    check_launch(trainer, ctx)
    return Job(data=data, model=model, regularizer=regularizer, logger=logger, trainer=trainer)
