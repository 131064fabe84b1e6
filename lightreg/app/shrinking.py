"""``shrink=true``: after the test, cut the trained network down to its live units, test the copy, save it.

The run directory gets

* ``shrunk.pt``: ``torch.save`` of a dict with ``module`` (the shrunk ``nn.Sequential``, made of plain torch
  modules: ``torch.load(path, weights_only=False)["module"]`` needs nothing but torch), ``report`` (as in
  ``shrink_report.json``), ``input_shape`` and ``task``;
* ``shrink_report.json``: ``lightreg.ShrinkReport.to_dict()``, per layer and in total;

and ``metrics.json`` gets ``shrink/params_before``, ``shrink/params_after``, the shrunk model's
``shrink/test/<metric>`` and ``shrink/test/loss``, and ``shrink/max_abs_diff``, the largest difference between
the two models' outputs over the test split. The shrunk model is tested at float32 (or the model's dtype)
without autocast; under mixed precision compare it with the original at that precision.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import lightning.pytorch as pl
import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from lightreg import print_shrink_report, shrink, shrink_report
from lightreg.app.config import ConfigError, RunContext

#: Strategies whose parameters are shards: the network is not whole on one rank after the fit.
SHARDED = ("FSDPStrategy", "ModelParallelStrategy", "DeepSpeedStrategy")


def check_shrink(cfg: DictConfig, trainer: pl.Trainer) -> None:
    """Refuse ``shrink=true`` with a sharding strategy before any training (the network is cut on rank 0)."""
    name = type(trainer.strategy).__name__
    if cfg.get("shrink") and name in SHARDED:
        raise ConfigError(f"shrink=true needs the whole network on one rank; strategy {name} shards it. "
                          "Use strategy=auto, gpu, ddp or ddp_cpu, or shrink a gathered copy yourself")


@torch.no_grad()
def evaluate(model: pl.LightningModule, net: nn.Module, loader: Any) -> tuple[dict[str, float], Tensor]:
    """The model's own test metrics and loss for ``net`` over ``loader``, and the concatenated outputs."""
    net.eval()
    metrics = model._stage_metrics()
    outputs, targets = [], []
    for x, y in loader:
        out = net(x)
        metrics.update(out.argmax(dim=1) if model.task == "classification" else out.squeeze(1), y if y.ndim == 1 else y.squeeze(1))
        outputs.append(out)
        targets.append(y)
    out = torch.cat(outputs)
    values = {f"test/{k}": float(v) for k, v in metrics.compute().items()}
    values["test/loss"] = float(model.loss(out, torch.cat(targets)))
    return values, out


def shrink_run(model: pl.LightningModule, data: Any, ctx: RunContext, *, report: bool = True) -> dict[str, float]:
    """Shrink ``model.net``, test the result on the test split, write ``shrunk.pt`` and ``shrink_report.json``;
    return the ``shrink/...`` metrics."""
    from lightreg.app.train import write_json_atomic

    model = model.cpu().eval()
    small = shrink(model.net)
    rows = tuple(replace(row, name=f"net.{row.name}") for row in shrink_report(small).rows)  # the parameter names
    result = replace(shrink_report(small), rows=rows)
    loader = data.test_dataloader()
    _, original = evaluate(model, model.net, loader)
    shrunk_metrics, shrunk = evaluate(model, small, loader)
    del small.shrink_report  # the saved module is plain torch: loading it needs nothing else
    torch.save({"module": small, "report": result.to_dict(), "input_shape": model.input_shape, "task": model.task},
               ctx.output_dir / "shrunk.pt")
    write_json_atomic(ctx.output_dir / "shrink_report.json", result.to_dict())
    if report:
        print_shrink_report(result, title=f"Shrink ({ctx.name})")
    return {
        "shrink/params_before": float(result.params_before),
        "shrink/params_after": float(result.params_after),
        **{f"shrink/{k}": v for k, v in shrunk_metrics.items()},
        "shrink/max_abs_diff": float((shrunk - original).abs().max()) if original.numel() else 0.0,
    }
