#!/usr/bin/env python
"""What ``shrink`` buys at inference: parameters and forward time of a group-lasso model before and after the cut.

Trains, for real and briefly, the app's digits MLP (64-256-256-10) and CNN (conv 16, conv 32, max-pool, linear) with
``Regularizer(GroupLasso(alpha, dim=0))`` on the hidden layers (proximal, SGD with momentum; the CNN also with
``with_bias=True``, whose dead filters output exactly ``relu(0)`` and so pass the zero-padded conv), shrinks each
trained network, checks that both give the same test accuracy (and the largest output difference), and times
a forward pass of a batch of 256 digits: the median over many passes, with one torch thread and the thread's
CPU-time clock (time other processes take from a shared machine is not counted). Original and shrunk passes
alternate, so drift hits both alike.

    python scripts/bench_shrink.py            # about a minute
    python scripts/bench_shrink.py --quick    # a smoke run: tiny models, one epoch, few passes
    python scripts/bench_shrink.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
import warnings
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from lightreg import GroupLasso, Regularizer, print_shrink_report, shrink, shrink_report
from lightreg.app.data import TabularData
from lightreg.app.models import CNN, MLP

BATCH = 256


def models(quick: bool) -> dict[str, dict[str, Any]]:
    """Per model: how to build it, which weights the group lasso prunes, its strength and the epochs."""
    common = dict(task="classification", in_features=64, num_outputs=10, input_shape=(1, 8, 8), optimizer="sgd",
                  momentum=0.9)
    width, channels, epochs = (32, 4, 1) if quick else (256, 16, 30)
    mlp_alpha, cnn_alpha = (5e-3, 1e-2) if quick else (3e-4, 2e-3)  # quick: strong enough to cut after one epoch
    mlp = dict(build=lambda: MLP(depth=2, width=width, lr=0.1, **common), include=["net.0.weight", "net.3.weight"],
               alpha=mlp_alpha, epochs=epochs, with_bias=False)
    cnn = dict(build=lambda: CNN(channels=channels, lr=0.05, **common), include=["net.1.weight", "net.3.weight"],
               alpha=cnn_alpha, epochs=epochs, with_bias=False)
    return {"mlp": mlp, "cnn": cnn, "cnn, with_bias": {**cnn, "with_bias": True}}


def train(spec: dict[str, Any], data: TabularData) -> pl.LightningModule:
    """A real Lightning fit with the group lasso on the hidden layers' units (rows, filters)."""
    pl.seed_everything(0, verbose=False)
    model = spec["build"]()
    penalty = GroupLasso(spec["alpha"], dim=0, with_bias=spec["with_bias"])
    trainer = pl.Trainer(max_epochs=spec["epochs"], logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[Regularizer(penalty, include=spec["include"])])
    trainer.fit(model, datamodule=data)
    return model.eval()


def median_forward_seconds(nets: list[nn.Module], x: torch.Tensor, repeats: int) -> list[float]:
    """Median thread-CPU seconds of ``net(x)`` for each net, passes alternating between the nets."""
    times: list[list[float]] = [[] for _ in nets]
    with torch.inference_mode():
        for _ in range(max(repeats // 10, 3)):  # warm-up: allocator, kernels
            for net in nets:
                net(x)
        for _ in range(repeats):
            for i, net in enumerate(nets):
                start = time.thread_time()
                net(x)
                times[i].append(time.thread_time() - start)
    return [statistics.median(t) for t in times]


@torch.no_grad()
def accuracy(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, torch.Tensor]:
    out = net(x)
    return float((out.argmax(1) == y).double().mean()), out


def measure(name: str, spec: dict[str, Any], data: TabularData, repeats: int, show: bool) -> dict[str, Any]:
    model = train(spec, data)
    net = model.net
    small = shrink(net)
    report = shrink_report(small)
    if show:
        print_shrink_report(report, title=f"shrink: {name}")
    x, y = data.splits["test"].tensors
    acc, out = accuracy(net, x, y)
    acc_small, out_small = accuracy(small, x, y)
    batch = x.repeat(BATCH // len(x) + 1, 1)[:BATCH]
    before, after = median_forward_seconds([net, small], batch, repeats)
    return {"params_before": report.params_before, "params_after": report.params_after,
            "units": [f"{r.units_before}->{r.units_after}" for r in report.rows], "acc": acc, "acc_shrunk": acc_small,
            "max_abs_diff": float((out - out_small).abs().max()), "us_before": before * 1e6, "us_after": after * 1e6,
            "speedup": before / after, "kept_constant": sum(r.kept_constant for r in report.rows)}


def table(results: dict[str, dict[str, Any]]) -> str:
    lines = ["| model | params | units | forward, batch 256 | speed-up | test acc (orig / shrunk) | max abs diff |",
             "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['params_before']:,} -> {r['params_after']:,} ({r['params_after'] / r['params_before']:.0%}) | "
            f"{', '.join(r['units'])} | {r['us_before']:.0f} us -> {r['us_after']:.0f} us | {r['speedup']:.2f}x | "
            f"{r['acc']:.4f} / {r['acc_shrunk']:.4f} | {r['max_abs_diff']:.1e} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny models, one epoch, few timed passes")
    parser.add_argument("--repeats", type=int, default=None, help="timed passes per model (default 300, quick 20)")
    parser.add_argument("--models", nargs="+", default=None, help="a subset of: mlp, cnn, 'cnn, with_bias'")
    parser.add_argument("--report", action="store_true", help="print each shrink report")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*(does not have many workers|LeafSpec).*")
    data = TabularData("digits", seed=0, batch_size=64)
    repeats = args.repeats or (20 if args.quick else 300)
    specs = models(args.quick)
    unknown = set(args.models or []) - set(specs)
    if unknown:
        parser.error(f"unknown models {sorted(unknown)}; choose from {sorted(specs)}")
    results = {name: measure(name, spec, data, repeats, args.report)
               for name, spec in specs.items() if args.models is None or name in args.models}
    print(table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"quick": args.quick, "repeats": repeats, "models": results}, f, indent=2)
    return results


if __name__ == "__main__":
    main()
