"""One ``lightreg-train`` run: build from the config, fit, test, report, write ``metrics.json``.

:func:`prepare` builds every object from the config and is the only place a bad configuration surfaces:
it raises :class:`~lightreg.app.config.ConfigError` (one line, exit status 2) before any process, W&B run or
checkpoint has started. What fails after that, inside ``fit`` or ``test``, is a crash or a bug and keeps its
traceback. The command line around this module is :mod:`lightreg.app.cli`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from hydra.errors import HydraException
from lightning.fabric.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from lightreg import WeightMonitor, print_report, sparsity_report
from lightreg.app.build import Job, build_job
from lightreg.app.config import ConfigError, RunContext
from lightreg.app.outputs import write_json_atomic
from lightreg.app.progress import say
from lightreg.app.tracking import finish_wandb, log_config
from lightreg.app.shrinking import InputCapture, check_shrink, find_submodule, shrink_run
from lightreg.stats.report import overall_sparsity

#: What building objects from the config raises for a bad value; reported as a ConfigError.
CONFIG_ERRORS = (ValueError, TypeError, HydraException, OmegaConfBaseException, MisconfigurationException)


def support_metrics(model: pl.LightningModule, true_support: Any) -> dict[str, float]:
    """How well the first layer's nonzero input columns match the synthetic problem's true support."""
    chosen = (model.input_weight().detach().abs().sum(dim=0) > 0).cpu()
    truth = torch.as_tensor(true_support)
    hits = int((chosen & truth).sum())
    precision = hits / max(int(chosen.sum()), 1)
    recall = hits / max(int(truth.sum()), 1)
    f1 = 2 * precision * recall / (precision + recall) if hits else 0.0
    return {"support/precision": precision, "support/recall": recall, "support/f1": f1,
            "support/selected": float(chosen.sum())}


def final_metrics(job: Job, fit_metrics: dict[str, float], test_results: list[dict[str, float]],
                  rows: list[dict[str, Any]], fit_seconds: float) -> dict[str, float]:
    """One flat dict: the last epoch's train/val metrics, ``trainer/epoch``, ``trainer/global_step`` and the
    penalty's ``reg/...`` (:class:`~lightreg.app.callbacks.FitResults`), the test metrics and the weights' sparsity."""
    metrics = dict(fit_metrics)
    for result in test_results:
        metrics.update({k: float(v) for k, v in result.items()})
    metrics["weights/global/sparsity"] = overall_sparsity(rows)
    for row in rows:
        metrics[f"weights/{row['name']}/sparsity"] = row["sparsity"]
    if getattr(job.data, "true_support", None) is not None:  # the synthetic set knows which features matter
        metrics.update(support_metrics(job.model, job.data.true_support))
    metrics["time/fit_seconds"] = fit_seconds
    return metrics


def prepare(cfg: DictConfig, ctx: RunContext) -> Job:
    """Build the run from ``cfg``; any bad value raises :class:`ConfigError` naming it, before anything starts."""
    try:
        job = build_job(cfg, ctx)
    except ConfigError:
        raise
    except CONFIG_ERRORS as err:
        raise ConfigError(str(err)) from err
    check_shrink(cfg, job.trainer)
    if cfg.get("shrink") and isinstance(module := find_submodule(job.model, str(cfg.shrink_module)), str):
        raise ConfigError(module.replace("shrink skipped: ", "shrink=true: "))  # a typo, known before any training
    return job


def capture_for_shrink(cfg: DictConfig, model: pl.LightningModule) -> InputCapture | None:
    """With ``shrink=true``, record what the submodule to shrink sees during the test (to compare the copy with)."""
    if not cfg.get("shrink"):
        return None
    module = find_submodule(model, cfg.shrink_module)
    return None if isinstance(module, str) else InputCapture(module)


def run(cfg: DictConfig, ctx: RunContext) -> dict[str, float]:
    """Fit and test the configured model; return the final metrics (also in ``metrics.json`` on rank 0)."""
    route_lightning_logs(ctx.output_dir)
    job = prepare(cfg, ctx)
    log_config(job.logger, cfg)  # starts the W&B run: only now that the configuration is known to be good
    start = time.perf_counter()
    job.trainer.fit(job.model, datamodule=job.data)
    fit_seconds = time.perf_counter() - start
    fit_metrics = {k: float(v) for k, v in job.trainer.callback_metrics.items() if v.numel() == 1}
    capture = capture_for_shrink(cfg, job.model)
    test_results = job.trainer.test(job.model, datamodule=job.data, verbose=False)
    if capture is not None:
        capture.close()
    monitor = next((c for c in job.trainer.callbacks if isinstance(c, WeightMonitor)), None)
    selection = (monitor.include, monitor.exclude) if monitor is not None else (None, None)
    rows = sparsity_report(job.model, *selection)  # collective under FSDP2
    metrics = final_metrics(job, fit_metrics, test_results, rows, fit_seconds)
    if job.trainer.is_global_zero:
        if cfg.report:
            print_report(rows, title=f"Weight sparsity ({ctx.name})")
        if cfg.get("shrink"):
            metrics.update(shrink_run(job.model, job.data, ctx, cfg.shrink_module, report=cfg.report, capture=capture))
        write_json_atomic(ctx.output_dir / "metrics.json", metrics)
        say(f"metrics: {ctx.output_dir / 'metrics.json'}")
        message = finish_wandb(job.logger, metrics)
        if message:
            say(message)
    return metrics


def _not_a_tip(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("💡 Tip")


def route_lightning_logs(output_dir: Path) -> None:
    """Lightning's log lines once, through the run's logging (console and ``train.log``), without its tip.

    Imported after Hydra has configured logging, Lightning still adds its own stderr handler to the
    ``lightning`` logger, so every line would appear twice. Every ``Trainer`` also logs an advertisement
    for Lightning's cloud logger, which has no switch. Without a log file of this run in ``output_dir``
    (Hydra's logging turned off, or ``run`` called from Python) Lightning's handlers are left as they are.
    """
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if _not_a_tip not in logger.filters:
            logger.addFilter(_not_a_tip)
    job_logs = [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)
                and Path(h.baseFilename).parent == output_dir.resolve()]
    if not job_logs:
        return
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        for handler in [h for h in logger.handlers if type(h) is logging.StreamHandler]:
            logger.removeHandler(handler)
        logger.propagate = True
