#!/usr/bin/env python
"""Target sparsity with lightreg against gradual magnitude pruning: same model, data, optimizer, epochs and seeds.

Methods, each on scikit-learn's 8x8 digits (the app's split and standardisation, test accuracy on the held-out
test split) with every Linear/Conv weight in the selection:

* ``dense``: no sparsity (the reference);
* ``pruning``: Lightning's ``ModelPruning``, global L1-unstructured magnitude pruning at every epoch end, on the
  cubic schedule of Zhu & Gupta over the first 2/3 of the epochs, then fine-tuning with the mask fixed;
* ``lightreg-l1`` / ``lightreg-l0``: ``Regularizer(L1 | L0, target_sparsity=s)`` with its defaults (the same cubic
  ramp over the first 2/3 of the steps, then the zeros frozen and the penalty off);

at each target sparsity, for SGD (momentum 0.9) and AdamW (lr 1e-3, weight_decay 0.01), on the MLP 64-256-256-10
and the small CNN of the app. Prints a table (mean ± std over seeds of the test accuracy, and the achieved
sparsity), draws accuracy against sparsity (one line per method), and writes every run as JSON.

    python scripts/compare_pruning.py                       # the full grid: 30 epochs, 3 seeds (long)
    python scripts/compare_pruning.py --quick               # a smoke run: tiny settings, seconds
    python scripts/compare_pruning.py --models mlp --optimizers adamw --targets 0.9 --jobs 2 --out docs/sparsity
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from statistics import mean, pstdev
from typing import Any

METHODS = ("dense", "pruning", "lightreg-l1", "lightreg-l0")
OPTIMIZERS = {"sgd": {"lr": 0.1, "momentum": 0.9}, "adamw": {"lr": 1e-3, "weight_decay": 0.01}}
MODELS = {"mlp": {"depth": 2, "width": 256}, "cnn": {"channels": 8}}


def cubic_amounts(target: float, ramp_epochs: int):
    """``epoch -> amount`` for ``ModelPruning``: the share of the still-unpruned weights to prune at that epoch's
    end, so that the sparsity after epoch ``e`` is ``target * (1 - (1 - (e + 1) / ramp_epochs)³)``."""

    def sparsity(e: int) -> float:
        return target * (1 - (1 - min(e + 1, ramp_epochs) / ramp_epochs) ** 3) if e >= 0 else 0.0

    def amount(epoch: int) -> float:
        if epoch >= ramp_epochs:
            return 0.0
        before, after = sparsity(epoch - 1), sparsity(epoch)
        return (after - before) / (1 - before)

    return amount


def run_one(cfg: dict[str, Any]) -> dict[str, Any]:
    """One training run; returns the config with ``test_acc``, ``sparsity`` and ``seconds``."""
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.callbacks import ModelPruning
    from torch import nn

    from lightreg import L0, L1, Regularizer
    from lightreg.app.data import TabularData
    from lightreg.app.models import CNN, MLP

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    start = time.perf_counter()
    data = TabularData("digits", batch_size=64, seed=cfg["seed"])
    pl.seed_everything(cfg["seed"], verbose=False)
    model_cls = MLP if cfg["model"] == "mlp" else CNN
    model = model_cls(optimizer=cfg["optimizer"], **OPTIMIZERS[cfg["optimizer"]], **MODELS[cfg["model"]], **data.describe())
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    callbacks: list[pl.Callback] = []
    if cfg["method"] == "pruning":
        ramp = round(2 * cfg["epochs"] / 3)
        callbacks.append(ModelPruning("l1_unstructured", parameters_to_prune=[(m, "weight") for m in layers],
                                      amount=cubic_amounts(cfg["target"], ramp), use_global_unstructured=True,
                                      use_lottery_ticket_hypothesis=False, make_pruning_permanent=True, verbose=0))
    elif cfg["method"].startswith("lightreg"):
        penalty = L1(0.0) if cfg["method"] == "lightreg-l1" else L0(0.0)
        callbacks.append(Regularizer(penalty, target_sparsity=cfg["target"]))
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=cfg["epochs"], logger=False, callbacks=callbacks,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(model, data)
    model.eval()
    x, y = data.splits["test"].tensors
    with torch.no_grad():
        acc = float((model(x).argmax(1) == y).float().mean())
    zeros = sum(int((m.weight == 0).sum()) for m in layers)
    total = sum(m.weight.numel() for m in layers)
    return {**cfg, "test_acc": acc, "sparsity": zeros / total, "seconds": time.perf_counter() - start}


def grid(args: argparse.Namespace) -> list[dict[str, Any]]:
    configs = []
    for model in args.models:
        for optimizer in args.optimizers:
            for method in args.methods:
                for target in [None] if method == "dense" else args.targets:
                    for seed in range(args.seeds):
                        configs.append({"model": model, "optimizer": optimizer, "method": method, "target": target,
                                        "seed": seed, "epochs": args.epochs})
    return configs


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["model"], r["optimizer"], r["target"], r["method"]), []).append(r)
    rows = []
    for (model, optimizer, target, method), rs in groups.items():
        accs = [r["test_acc"] for r in rs]
        rows.append({"model": model, "optimizer": optimizer, "target": target, "method": method, "seeds": len(rs),
                     "acc_mean": mean(accs), "acc_std": pstdev(accs), "sparsity_mean": mean(r["sparsity"] for r in rs),
                     "sparsity_max_error": max(abs(r["sparsity"] - target) for r in rs) if target else None})
    order = {m: i for i, m in enumerate(METHODS)}
    return sorted(rows, key=lambda r: (r["model"], r["optimizer"], r["target"] or 0.0, order[r["method"]]))


def format_table(rows: list[dict[str, Any]]) -> str:
    out = ["| model | optimizer | target | method | test accuracy (mean ± std) | sparsity |", "|---|---|---:|---|---:|---:|"]
    for r in rows:
        target = "-" if r["target"] is None else f"{r['target']:g}"
        out.append(f"| {r['model']} | {r['optimizer']} | {target} | {r['method']} | "
                   f"{r['acc_mean']:.4f} ± {r['acc_std']:.4f} | {r['sparsity_mean']:.4f} |")
    return "\n".join(out)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Accuracy against the reached sparsity, one panel per (model, optimizer), one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["model"], r["optimizer"]) for r in rows})
    cols = min(len(panels), 2)
    rows_n = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(5.5 * cols, 4 * rows_n), squeeze=False, constrained_layout=True)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (model, optimizer) in zip(axes.flat, panels):
        for i, method in enumerate(METHODS):
            pts = [r for r in rows if (r["model"], r["optimizer"], r["method"]) == (model, optimizer, method)]
            if method == "dense":
                for r in pts:
                    ax.axhline(r["acc_mean"], color="gray", ls="--", lw=1, label="dense")
                continue
            if pts:
                ax.errorbar([r["sparsity_mean"] for r in pts], [r["acc_mean"] for r in pts],
                            yerr=[r["acc_std"] for r in pts], marker="o", ms=4, capsize=3, color=f"C{i}", label=method)
        ax.set_title(f"{model}, {optimizer}")
        ax.set_xlabel("sparsity (fraction of exact zeros)")
        ax.set_ylabel("test accuracy")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="mlp,cnn", help="comma-separated subset of mlp,cnn")
    p.add_argument("--optimizers", default="sgd,adamw", help="comma-separated subset of sgd,adamw")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--targets", default="0.5,0.8,0.9,0.95", help="comma-separated target sparsities")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..n-1 (model init, data split and order)")
    p.add_argument("--epochs", type=int, default=30, help="epochs per run (the ramps end at 2/3 of them)")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel (one torch thread each)")
    p.add_argument("--quick", action="store_true", help="a smoke run: mlp, adamw, target 0.8, 1 seed, 3 epochs")
    p.add_argument("--out", type=Path, default=Path("compare_pruning"), help="writes <out>.json and <out>.png")
    p.add_argument("--replot", type=Path, default=None, help="redraw <out>.png and reprint the table from this JSON; no runs")
    args = p.parse_args(argv)
    if args.quick:
        args.models, args.optimizers, args.targets, args.seeds, args.epochs = "mlp", "adamw", "0.8", 1, 3
    args.models, args.optimizers = args.models.split(","), args.optimizers.split(",")
    args.methods = args.methods.split(",")
    args.targets = [float(t) for t in args.targets.split(",")]
    for name, values, known in (("models", args.models, MODELS), ("optimizers", args.optimizers, OPTIMIZERS),
                                ("methods", args.methods, METHODS)):
        unknown = [v for v in values if v not in known]
        if unknown:
            p.error(f"unknown --{name} {unknown}; known: {list(known)}")
    if not all(0 < t < 1 for t in args.targets):
        p.error(f"--targets must be in (0, 1), got {args.targets}")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.replot is not None:
        result = json.loads(args.replot.read_text())
        print(format_table(result["rows"]))
        plot(result["rows"], args.out.with_suffix(".png"))
        return result
    configs = grid(args)
    start = time.perf_counter()
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs) as pool:
            runs = list(pool.map(run_one, configs))
    else:
        runs = [run_one(c) for c in configs]
    rows = summarize(runs)
    print(format_table(rows))
    print(f"\n{len(runs)} runs in {time.perf_counter() - start:.0f} s ({mean(r['seconds'] for r in runs):.1f} s per run)")
    result = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "rows": rows, "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    plot(rows, args.out.with_suffix(".png"))
    print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.png')}")
    return result


if __name__ == "__main__":
    main()
