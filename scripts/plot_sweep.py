#!/usr/bin/env python
"""Plot a ``lightreg-train -m`` sweep: validation metric and global sparsity against alpha, one line per penalty.

    lightreg-train -m penalty=l1,elastic_net penalty.log10_alpha='range(-5,0,0.5)'
    python scripts/plot_sweep.py multirun/2026-01-01/12-00-00 -o sweep.png

A sweep over target sparsities instead (``-m penalty=l1,l0 penalty.target_sparsity=0.5,0.8,0.9,0.95``) is drawn
against the sparsity each job reached: the validation metric, and the reached against the requested sparsity.

Reads every job's ``metrics.json`` and ``.hydra/config.yaml`` (and ``.hydra/hydra.yaml`` for the penalty
choice) under the sweep directory. ``penalty=none`` jobs (no alpha) are drawn as a dashed baseline.
Jobs that differ only in the seed are averaged, with their spread as error bars. The picture shows
where alpha stops helping and starts underfitting: the validation curve bends down as sparsity rises.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from statistics import mean, pstdev

try:
    import matplotlib
    from omegaconf import OmegaConf
except ImportError as err:  # the library alone was installed
    raise SystemExit(f"plot_sweep.py needs {err.name}, part of the app's extra: pip install 'lightreg[app]'") from None

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from lightreg.app.config import register_resolvers  # noqa: E402

SPARSITY = "weights/global/sparsity"
LOWER_IS_BETTER = ("loss", "mse", "mae")


def load_jobs(sweep_dir: Path) -> list[dict]:
    """One dict per finished job: ``penalty``, ``alpha``, ``metrics``, ``dir``, ``data``, ``model``."""
    register_resolvers()
    jobs = []
    for metrics_file in sorted(sweep_dir.rglob("metrics.json")):
        job_dir = metrics_file.parent
        config_file = job_dir / ".hydra" / "config.yaml"
        if not config_file.is_file():
            continue
        cfg = OmegaConf.load(config_file)
        choices = {}
        hydra_file = job_dir / ".hydra" / "hydra.yaml"
        if hydra_file.is_file():
            choices = dict(OmegaConf.load(hydra_file).hydra.runtime.choices)
        target = OmegaConf.select(cfg, "penalty._target_")
        penalty = choices.get("penalty") or (target.rsplit(".", 1)[-1].lower() if target else "none")
        alpha = OmegaConf.select(cfg, "penalty.alpha") if target else None
        sparsity_target = OmegaConf.select(cfg, "penalty.target_sparsity", default=None) if target else None
        if target and OmegaConf.select(cfg, "penalty.l1_ratio") is not None and penalty == "elastic_net":
            penalty = f"elastic_net (l1_ratio={cfg.penalty.l1_ratio:g})"
        jobs.append({
            "dir": job_dir, "penalty": penalty, "alpha": None if alpha is None else float(alpha),
            "target": None if sparsity_target is None else float(sparsity_target),
            "metrics": json.loads(metrics_file.read_text()),
            "data": choices.get("data", "?"), "model": choices.get("model", "?"),
        })
    return jobs


def pick_metric(jobs: list[dict], metric: str | None) -> str:
    """``metric`` if given, else ``val/acc`` when the jobs have it, else ``val/mse``."""
    if metric:
        return metric
    return "val/acc" if all("val/acc" in j["metrics"] for j in jobs) else "val/mse"


def curves(jobs: list[dict], key: str) -> dict[str, tuple[list[float], list[float], list[float]]]:
    """Per penalty: sorted alphas, the mean of ``key`` over jobs at each alpha, and its spread."""
    points: dict[str, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for job in jobs:
        if job["alpha"] is not None and key in job["metrics"]:
            points[job["penalty"]][job["alpha"]].append(job["metrics"][key])
    out = {}
    for penalty, by_alpha in sorted(points.items()):
        alphas = sorted(by_alpha)
        out[penalty] = (alphas, [mean(by_alpha[a]) for a in alphas], [pstdev(by_alpha[a]) for a in alphas])
    return out


def target_curves(jobs: list[dict], key: str) -> dict[str, list[tuple[float, float, float, float, float]]]:
    """Per penalty, per requested target: (target, mean reached sparsity, its spread, mean ``key``, its spread)."""
    points: dict[str, dict[float, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for job in jobs:
        if job["target"] is not None and key in job["metrics"] and SPARSITY in job["metrics"]:
            points[job["penalty"]][job["target"]].append(job["metrics"])
    out = {}
    for penalty, by_target in sorted(points.items()):
        out[penalty] = [(t, mean(m[SPARSITY] for m in ms), pstdev([m[SPARSITY] for m in ms]),
                         mean(m[key] for m in ms), pstdev([m[key] for m in ms])) for t, ms in sorted(by_target.items())]
    return out


def plot_targets(jobs: list[dict], metric: str, output: Path) -> None:
    """The metric against the sparsity each target reached, and the reached against the requested sparsity."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    for i, (penalty, pts) in enumerate(target_curves(jobs, metric).items()):
        targets, reached, reached_sd, values, values_sd = zip(*pts, strict=True)
        axes[0].errorbar(reached, values, xerr=reached_sd if any(reached_sd) else None,
                         yerr=values_sd if any(values_sd) else None, marker="o", ms=4, capsize=3, color=f"C{i}", label=penalty)
        axes[1].plot(targets, reached, marker="o", ms=4, color=f"C{i}", label=penalty)
    base = baseline(jobs, metric)
    if base is not None:
        axes[0].axhline(base, color="gray", ls="--", lw=1, label="no penalty")
    axes[1].plot([0, 1], [0, 1], color="gray", ls=":", lw=1, label="reached = requested")
    axes[0].set_xlabel("global sparsity reached (fraction of exact zeros)")
    axes[0].set_ylabel(f"{metric} (validation)")
    axes[1].set_xlabel("target sparsity requested")
    axes[1].set_ylabel("global sparsity reached")
    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    data, model = sorted({j["data"] for j in jobs}), sorted({j["model"] for j in jobs})
    fig.suptitle(f"Sweep over target sparsity: model={','.join(model)}, data={','.join(data)} ({len(jobs)} runs)")
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=120)
    plt.close(fig)


def baseline(jobs: list[dict], key: str) -> float | None:
    values = [j["metrics"][key] for j in jobs if j["alpha"] is None and key in j["metrics"]]
    return mean(values) if values else None


def plot(jobs: list[dict], metric: str, output: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    lower_better = any(metric.endswith(s) for s in LOWER_IS_BETTER)
    for ax, key, label in ((axes[0], metric, f"{metric} (validation)"), (axes[1], SPARSITY, "global sparsity (fraction of exact zeros)")):
        for i, (penalty, (alphas, values, spread)) in enumerate(curves(jobs, key).items()):
            color = f"C{i}"
            ax.errorbar(alphas, values, yerr=spread if any(spread) else None, marker="o", ms=4, capsize=3,
                        color=color, label=penalty)
            if key == metric:
                best = (min if lower_better else max)(range(len(values)), key=values.__getitem__)
                ax.scatter([alphas[best]], [values[best]], s=140, facecolors="none", edgecolors=color, linewidths=1.5)
        base = baseline(jobs, key)
        if base is not None:
            ax.axhline(base, color="gray", ls="--", lw=1, label="no penalty")
        ax.set_xscale("log")
        ax.set_xlabel("alpha (penalty strength, log scale)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[1].set_ylim(-0.03, 1.03)
    axes[0].legend(fontsize=8, title="penalty (circle = best alpha)", title_fontsize=8)
    data = sorted({j["data"] for j in jobs})
    model = sorted({j["model"] for j in jobs})
    fig.suptitle(f"Sweep over alpha: model={','.join(model)}, data={','.join(data)} ({len(jobs)} runs)")
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path, help="the multirun directory (holds one sub-folder per job)")
    parser.add_argument("-o", "--output", type=Path, default=Path("sweep.png"), help="the image to write")
    parser.add_argument("--metric", default=None, help="validation metric to plot (default: val/acc, else val/mse)")
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        parser.error(f"{args.sweep_dir} is not a directory")
    jobs = load_jobs(args.sweep_dir)
    if not [j for j in jobs if j["alpha"] is not None]:
        parser.error(f"no finished job with a penalty (metrics.json + .hydra/config.yaml) under {args.sweep_dir}")
    metric = pick_metric(jobs, args.metric)
    if any(j["target"] is not None for j in jobs):
        print(f"{'penalty':<32} {'target':>7} {metric:>10} {'sparsity':>9}")
        for job in sorted(jobs, key=lambda j: (j["penalty"], j["target"] or 0.0)):
            m, target = job["metrics"], "-" if job["target"] is None else f"{job['target']:g}"
            print(f"{job['penalty']:<32} {target:>7} {m.get(metric, float('nan')):>10.4f} {m.get(SPARSITY, float('nan')):>9.3f}")
        plot_targets(jobs, metric, args.output)
        print(f"wrote {args.output}")
        return 0
    print(f"{'penalty':<32} {'alpha':>10} {metric:>10} {'sparsity':>9}")
    for job in sorted(jobs, key=lambda j: (j["penalty"], j["alpha"] or 0.0)):
        m = job["metrics"]
        alpha = "-" if job["alpha"] is None else f"{job['alpha']:.3g}"
        print(f"{job['penalty']:<32} {alpha:>10} {m.get(metric, float('nan')):>10.4f} {m.get(SPARSITY, float('nan')):>9.3f}")
    plot(jobs, metric, args.output)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
