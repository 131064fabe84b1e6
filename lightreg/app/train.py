"""``lightreg-train``: train one model with one penalty, as composed from ``conf/train.yaml``.

    lightreg-train                                    # MLP on digits, elastic net, proximal
    lightreg-train model=linear data=diabetes penalty=l1 penalty.alpha=1e-2
    lightreg-train -m penalty=l1,elastic_net penalty.log10_alpha=range(-5,0)   # a log-spaced sweep

Each run fits, tests, prints a per-layer sparsity table and writes ``metrics.json`` (flat final
metrics) into its Hydra output directory, atomically. A bad configuration ends with one clear line
on stderr and exit status 2 (``HYDRA_FULL_ERROR=1`` shows the traceback instead).
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
import torch
from hydra.errors import HydraException
from lightning.fabric.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lightreg import print_report, sparsity_report
from lightreg.app.build import (
    build_callbacks,
    build_data,
    build_model,
    build_regularizer,
    check_launch,
    check_selection,
    trainer_kwargs,
)
from lightreg.app.config import ConfigError, RunContext, config_dir, register_resolvers
from lightreg.app.shrinking import check_shrink, shrink_run
from lightreg.app.tracking import abort_wandb, build_logger, finish_wandb, log_config
from lightreg.emit import to_floats
from lightreg.report import overall_sparsity

#: Errors that mean "the configuration is wrong", reported without a traceback.
BAD_INPUT = (ConfigError, ValueError, TypeError, HydraException, OmegaConfBaseException, MisconfigurationException)


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` to ``path`` via a temporary file and ``os.replace``: readers never see half a file.

    Example:
        >>> import tempfile
        >>> p = Path(tempfile.mkdtemp()) / "m.json"
        >>> write_json_atomic(p, {"val/acc": 0.5}); json.loads(p.read_text())
        {'val/acc': 0.5}
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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


def final_metrics(trainer: pl.Trainer, model: pl.LightningModule, data: Any, regularizer: Any,
                  fit_metrics: dict[str, float], test_results: list[dict[str, float]], rows: list[dict[str, Any]],
                  fit_seconds: float) -> dict[str, float]:
    """One flat dict: the last epoch's train/val metrics, the test metrics and the weights' sparsity."""
    metrics = dict(fit_metrics)
    for result in test_results:
        metrics.update({k: float(v) for k, v in result.items()})
    metrics["weights/global/sparsity"] = overall_sparsity(rows)
    for row in rows:
        metrics[f"weights/{row['name']}/sparsity"] = row["sparsity"]
    if regularizer is not None:  # R(w) of the final weights at the last step's alpha; a collective under FSDP2
        metrics.update(to_floats(regularizer.metrics()))
    if getattr(data, "true_support", None) is not None:
        metrics.update(support_metrics(model, data.true_support))
    metrics.update({"trainer/global_step": float(trainer.global_step), "trainer/epoch": float(trainer.current_epoch),
                    "time/fit_seconds": fit_seconds})
    return metrics


def run(cfg: DictConfig, ctx: RunContext) -> dict[str, float]:
    """Fit and test the configured model; return the final metrics (also in ``metrics.json`` on rank 0)."""
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)  # every ??? and ${...} fails here, first
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    data = build_data(cfg)
    model = build_model(cfg, data)
    regularizer = build_regularizer(cfg.penalty)
    monitor = cfg.get("monitor") or {}
    check_selection(model, regularizer, monitor)
    callbacks = build_callbacks(cfg, ctx, regularizer)
    kwargs = trainer_kwargs(cfg)
    logger = build_logger(cfg.logger, cfg, ctx)
    try:
        trainer = pl.Trainer(**kwargs, callbacks=callbacks, logger=logger if logger is not None else False,
                             default_root_dir=str(ctx.output_dir))
    except MisconfigurationException as err:  # e.g. a GPU strategy on a machine without one
        raise ConfigError(f"strategy={ctx.choices.get('strategy', '?')} (accelerator={kwargs.get('accelerator')}): {err}") from err
    check_launch(trainer, ctx)
    check_shrink(cfg, trainer)
    log_config(logger, cfg)
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    fit_seconds = time.perf_counter() - start
    fit_metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    test_results = trainer.test(model, datamodule=data, verbose=False)
    rows = sparsity_report(model, monitor.get("include"), monitor.get("exclude"))  # collective under FSDP2
    metrics = final_metrics(trainer, model, data, regularizer, fit_metrics, test_results, rows, fit_seconds)
    if trainer.is_global_zero:
        if cfg.report:
            print_report(rows, title=f"Weight sparsity ({ctx.name})")
        if cfg.get("shrink"):
            metrics.update(shrink_run(model, data, ctx, report=cfg.report))
        write_json_atomic(ctx.output_dir / "metrics.json", metrics)
        message = finish_wandb(logger, metrics)
        print(f"metrics: {ctx.output_dir / 'metrics.json'}" + (f"\n{message}" if message else ""))
    return metrics


def _short(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    lines = [line for line in text.splitlines() if line.strip()][:6]
    return "\n  ".join(lines)


def run_or_exit(cfg: DictConfig, ctx: RunContext | None = None) -> float | None:
    """``run`` with bad input turned into one message and exit status 2; returns ``cfg.optimized_metric``."""
    ctx = ctx or RunContext.from_hydra(cfg)
    try:
        metrics = run(cfg, ctx)
    except BAD_INPUT as err:
        abort_wandb()
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"lightreg-train: error: {_short(err)}\n  (set HYDRA_FULL_ERROR=1 for the traceback)", file=sys.stderr)
        sys.exit(2)
    except BaseException:
        abort_wandb()
        raise
    name = cfg.get("optimized_metric")
    if name:
        if name not in metrics:
            raise ConfigError(f"optimized_metric {name!r} is not among the final metrics: {sorted(metrics)}")
        return metrics[name]
    return None


register_resolvers()


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
def _hydra_main(cfg: DictConfig) -> float | None:
    return run_or_exit(cfg)


def main() -> None:
    """The ``lightreg-train`` console script and ``python -m lightreg``."""
    # Lightning 2.6 on torch 2.13 warns about its own use of a deprecated pytree API: noise in a first run.
    warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
    _hydra_main()


if __name__ == "__main__":
    main()
