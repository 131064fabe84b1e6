"""Experiment loggers for the app, W&B first: offline by default, one run per job, finished after it.

The W&B mode is ``logger.offline`` when set (``true`` -> ``offline``, ``false`` -> ``online``), else
the ``WANDB_MODE`` environment variable, else ``offline``: a first run needs no account and no network.
"""

from __future__ import annotations

import os
from pathlib import Path

from hydra.utils import get_class, instantiate
from lightning.pytorch.loggers import Logger, WandbLogger
from omegaconf import DictConfig, OmegaConf

from lightreg.app.config import ConfigError, RunContext
from lightreg.app.validate import check_arguments

WANDB_TARGET = "lightning.pytorch.loggers.WandbLogger"


def wandb_mode(offline: bool | None) -> str:
    """``offline``/``online`` from the config switch, else ``WANDB_MODE``, else ``offline``.

    Example:
        >>> wandb_mode(True), wandb_mode(False)
        ('offline', 'online')
    """
    if offline is not None:
        return "offline" if offline else "online"
    mode = os.environ.get("WANDB_MODE", "offline")
    return "offline" if mode == "dryrun" else mode


def build_logger(node: DictConfig | None, cfg: DictConfig, ctx: RunContext) -> Logger | None:
    """Instantiate ``cfg.logger`` into ``ctx.output_dir``; W&B gets its mode, group, name and tags."""
    if node is None or node.get("_target_") is None:
        return None
    kwargs = OmegaConf.to_container(node, resolve=True)
    assert isinstance(kwargs, dict)
    if kwargs.get("save_dir") is None:
        kwargs["save_dir"] = str(ctx.output_dir)
    target = kwargs.pop("_target_")
    offline = kwargs.pop("offline", None) if target == WANDB_TARGET else None  # null is ours: see wandb_mode
    check_arguments(get_class(target), kwargs, "logger")
    if target != WANDB_TARGET:
        return instantiate({"_target_": target, **kwargs}, _convert_="all")
    mode = wandb_mode(offline)
    if mode not in ("offline", "online", "disabled", "shared"):
        raise ConfigError(f"W&B mode must be offline, online or disabled, got {mode!r} (from WANDB_MODE)")
    if mode != "online" and kwargs.get("log_model"):
        raise ConfigError("logger.log_model needs an online W&B run: set logger.offline=false or logger.log_model=false")
    kwargs["group"] = kwargs.get("group") or ctx.group
    kwargs["name"] = kwargs.get("name") or ctx.name
    choice_tags = [f"{k}:{ctx.choices[k]}" for k in ("model", "data", "penalty", "strategy") if k in ctx.choices]
    kwargs["tags"] = [*choice_tags, *(kwargs.get("tags") or []), *(cfg.get("tags") or [])]
    kwargs["job_type"] = "sweep" if ctx.multirun else "train"
    # offline=False keeps Lightning from rewriting WANDB_MODE for the rest of the process; mode decides.
    logger = instantiate({"_target_": target, **kwargs}, offline=False, mode=mode, _convert_="all")
    # WandbLogger passes anonymous=None to wandb.init, which warns that the setting is deprecated
    # whatever its value; leaving it out changes nothing else.
    logger._wandb_init.pop("anonymous", None)
    return logger


def log_config(logger: Logger | None, cfg: DictConfig) -> None:
    """Send the resolved config to the logger (rank 0). For W&B this starts the run, so it comes after
    every configuration check: a refused configuration leaves no empty run behind."""
    if logger is not None:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))


def finish_wandb(logger: Logger | None, summary: dict[str, float] | None, exit_code: int = 0) -> str | None:
    """Write ``summary`` to the W&B run, finish it, and return a how-to-find-it message (rank 0 only).

    ``WandbLogger`` never finishes its run, and reuses an open one: without this, every job of a
    multirun would land in the first job's run.
    """
    import wandb

    if not isinstance(logger, WandbLogger) or logger._experiment is None or wandb.run is None:
        return None
    run = wandb.run
    if summary:
        run.summary.update(summary)
    offline = run.settings.mode in ("offline", "dryrun")
    run_dir = Path(run.dir).parent  # .../wandb/offline-run-<time>-<id>; run.dir is its files/ folder
    url = None if offline else run.url
    wandb.finish(exit_code=exit_code)
    if offline:
        return f"W&B run saved offline in {run_dir}\n  upload it with:  wandb sync {run_dir}"
    return f"W&B run: {url}" if url else None
