"""``shrink=true``: after the test, cut the trained network down to its live units, compare, save it.

``shrink_module`` names the submodule to cut (``net`` for the app's models; a dotted path such as ``head`` or
``encoder.ffn`` for a user's model). A model without that submodule, or one :func:`lightreg.shrink` cannot cut, is
skipped with one line saying why, and the run goes on. The run directory gets

* ``shrunk.pt2``: the shrunk submodule as a ``torch.export`` program, traced on an input it saw during the test
  (any batch size), with the report inside: ``lightreg.load_shrunk(path)`` returns ``(module, report)`` and
  unpickles no code (``torch.load(..., weights_only=False)`` is never needed);
* ``shrink_report.json``: the report's ``to_dict()``, per layer and in total.

An ``nn.Sequential`` is cut by :func:`lightreg.shrink` on its own; any other submodule (or the whole model, with
``shrink_module=''``) is traced by Torch-Pruning's dependency graph on the first input it saw during the test, or
on its ``example_input_array``, and its exactly-zero coupled groups are cut (``penalty=coupled_group_lasso``
makes them).

and ``metrics.json`` gets ``shrink/params_before``, ``shrink/params_after`` and ``shrink/max_abs_diff``, the largest
difference between the two submodules' outputs on the inputs the submodule saw during the test (captured by a
forward pre-hook, :class:`InputCapture`). The app's own models also get ``shrink/test/<metric>`` and
``shrink/test/loss`` of the shrunk network. The shrunk module runs at float32 (or the model's dtype) without
autocast; under mixed precision compare it with the original at that precision.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import lightning.pytorch as pl
import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from lightreg import print_shrink_report, print_traced_report, save_shrunk, shrink
from lightreg.app.config import ConfigError, RunContext
from lightreg.app.outputs import write_json_atomic

#: Strategies whose parameters are shards: the network is not whole on one rank after the fit.
SHARDED = ("FSDPStrategy", "ModelParallelStrategy", "DeepSpeedStrategy")


def check_shrink(cfg: DictConfig, trainer: pl.Trainer) -> None:
    """Refuse ``shrink=true`` with a sharding strategy before any training (the network is cut on rank 0)."""
    name = type(trainer.strategy).__name__
    if cfg.get("shrink") and name in SHARDED:
        raise ConfigError(f"shrink=true needs the whole network on one rank; strategy {name} shards it. "
                          "Use strategy=auto, gpu, ddp or ddp_cpu, or shrink a gathered copy yourself")


class InputCapture:
    """Keeps (on the CPU) the positional inputs of the first ``limit`` calls of ``module`` while it is attached."""

    def __init__(self, module: nn.Module, limit: int = 8) -> None:
        self.inputs: list[tuple[Tensor, ...]] = []
        self.limit = limit
        self._handle = module.register_forward_pre_hook(self._keep)

    def _keep(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if len(self.inputs) < self.limit and all(isinstance(a, Tensor) for a in args):
            self.inputs.append(tuple(a.detach().cpu() for a in args))

    def close(self) -> None:
        self._handle.remove()


def find_submodule(model: nn.Module, path: str) -> nn.Module | str:
    """``model``'s submodule at the dotted ``path``, or a line saying why there is none."""
    try:
        return model.get_submodule(path)
    except AttributeError:
        names = [n for n, _ in model.named_children()]
        return f"shrink skipped: the model has no submodule {path!r} (set shrink_module to one of {names}, or '' for the whole model)"


def shrink_submodule(module: nn.Module, example_inputs: Any = None) -> nn.Module:
    """The app's one call into :func:`lightreg.shrink`: an ``nn.Sequential`` by its chain of layers, any other module
    traced on ``example_inputs`` (raises ``TypeError``/``ValueError`` for a module it cannot cut)."""
    if isinstance(module, nn.Sequential) or example_inputs is None:
        return shrink(module)
    return shrink(module, example_inputs=example_inputs)


def example_of(module: nn.Module, capture: InputCapture | None) -> Any:
    """An input of ``module``: the first it saw during the test, else its ``example_input_array`` (or ``None``)."""
    if capture is not None and capture.inputs:
        args = tuple(a.clone() for a in capture.inputs[0])  # a copy made outside the test's inference mode
        return args[0] if len(args) == 1 else args
    return getattr(module, "example_input_array", None)


@torch.no_grad()
def evaluate(model: pl.LightningModule, net: nn.Module, loader: Any) -> tuple[dict[str, float], Tensor]:
    """The app's model's own test metrics and loss for ``net`` over ``loader``, and the concatenated outputs."""
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


@torch.no_grad()
def max_abs_diff(original: nn.Module, small: nn.Module, inputs: list[tuple[Tensor, ...]]) -> float:
    """The largest difference between the two modules' outputs over ``inputs``."""
    original.eval()
    small.eval()
    worst = 0.0
    for args in inputs:
        a, b = original(*args), small(*args)
        if a.numel():
            worst = max(worst, float((a - b).abs().max()))
    return worst


def shrink_run(model: pl.LightningModule, data: Any, ctx: RunContext, path: str = "net", *, report: bool = True,
               capture: InputCapture | None = None) -> dict[str, float]:
    """Shrink ``model.<path>``, compare it with the original, write ``shrunk.pt`` and ``shrink_report.json``; return
    the ``shrink/...`` metrics (none, after one line saying why, when the model has nothing to shrink)."""
    from lightreg.app.progress import say

    model = model.cpu().eval()
    module = find_submodule(model, path)
    if isinstance(module, str):
        say(module)
        return {}
    example = example_of(module, capture)
    try:
        small = shrink_submodule(module, example)
    except (TypeError, ValueError, RuntimeError, ImportError) as err:
        say(f"shrink skipped: {path} ({type(module).__name__}): {err}")
        return {}
    result = small.shrink_report
    if isinstance(module, nn.Sequential):  # name the rows as the parameters: net.0, net.3, ...
        result = replace(result, rows=tuple(replace(row, name=f"{path}.{row.name}") for row in result.rows))
        small.shrink_report = result
    metrics: dict[str, float] = {}
    if hasattr(model, "_stage_metrics") and path == "net":  # the app's models: the shrunk net's own test metrics
        loader = data.test_dataloader()
        _, original = evaluate(model, module, loader)
        shrunk_metrics, shrunk = evaluate(model, small, loader)
        metrics.update({f"shrink/{k}": v for k, v in shrunk_metrics.items()})
        metrics["shrink/max_abs_diff"] = float((shrunk - original).abs().max()) if original.numel() else 0.0
    elif capture is not None:
        metrics["shrink/max_abs_diff"] = max_abs_diff(module, small, capture.inputs)
    if example is not None:
        save_shrunk(small, ctx.output_dir / "shrunk.pt2", example)
    else:
        say("shrunk.pt2 not written: no input of the submodule was seen (set the model's example_input_array)")
    write_json_atomic(ctx.output_dir / "shrink_report.json", result.to_dict())
    if report and isinstance(module, nn.Sequential):
        print_shrink_report(result, title=f"Shrink ({ctx.name})")
    elif report:
        print_traced_report(result, title=f"Shrink ({ctx.name})")
    return {"shrink/params_before": float(result.params_before), "shrink/params_after": float(result.params_after),
            **metrics}
