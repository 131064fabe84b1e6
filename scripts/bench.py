#!/usr/bin/env python
"""What regularization costs a Lightning training step, against every alternative and against the floor.

Every configuration runs inside a real ``lightning.Trainer.fit`` with the real callbacks, and they take
turns (a shuffled order in each round, fresh model each fit) so that drift of a shared machine hits all
of them alike. Per configuration and model it reports:

* ``step``: the training step (Trainer-level, batch start to batch start; mean over a window of
  ``--steps`` steps that holds one WeightMonitor logging step; median over rounds) and its ratio to the
  unregularized step in the same round;
* ``added``: the time spent inside the callback's own methods during those steps (every method the
  callback class defines, counted once at the outermost call), as a share of the plain step and as a
  multiple of the **floor** (one in-place read-modify-write pass over the penalised tensors, itself a
  callback). For configurations without a callback (hand-written loss term, optimizer weight decay)
  ``added`` is the step difference;
* ``extra``: the peak memory a configuration adds: of one whole step over the plain step's peak, and of
  the temporaries inside the callback's own calls, against the largest penalised tensor.

On CPU memory comes from ``torch.profiler`` allocation events (torch's allocator, which tracemalloc does
not see); on CUDA from ``torch.cuda.max_memory_allocated``. The default clock on CPU is the thread's CPU
time with one torch thread: time other processes take from the machine is not counted, which keeps
ratios stable on shared cores. ``--clock wall --threads 2`` measures wall time on both cores instead.

Run ``python scripts/bench.py`` (a few minutes), ``--quick`` for a smoke run, ``--json out.json``.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import json
import random
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightreg
from lightreg import L1, L2, ElasticNet, GroupLasso, Regularizer
from lightreg.selection import select_parameters

ALPHA, LR = 1e-4, 1e-3
PENALTIES = {"l1": lambda: L1(ALPHA), "l2": lambda: L2(ALPHA), "elastic_net": lambda: ElasticNet(ALPHA, 0.5),
             "group_lasso": lambda: GroupLasso(ALPHA, dim=0)}
MODES = ("gradient", "decoupled", "proximal")
#: Scalar bookkeeping tensors (a step count, an lr) that the memory target does not count.
SLACK_BYTES = 1024


# ---- models -------------------------------------------------------------------------------------
def make_model(name: str, quick: bool) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """``(net, inputs, targets)``: the 12 x 512 MLP with LayerNorm, a Transformer encoder, a CNN."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    if name == "mlp":  # 12 x 512 x 512 = 3.1 M penalised weights
        width, depth, batch = (32, 2, 8) if quick else (512, 12, 128)
        layers: list[nn.Module] = []
        for _ in range(depth):
            layers += [nn.Linear(width, width), nn.LayerNorm(width), nn.GELU()]
        net = nn.Sequential(*layers, nn.Linear(width, 10))
        x = torch.randn(batch, width, generator=g)
    elif name == "transformer":  # many small tensors: 4 per layer
        d, n_layers, seq, batch = (16, 1, 4, 4) if quick else (128, 6, 32, 32)
        layer = nn.TransformerEncoderLayer(d, nhead=4, dim_feedforward=2 * d, dropout=0.0, batch_first=True)
        net = nn.Sequential(nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False),
                            nn.Flatten(), nn.Linear(seq * d, 10))
        x = torch.randn(batch, seq, d, generator=g)
    elif name == "cnn":
        c, size, batch = (4, 8, 4) if quick else (32, 32, 64)
        net = nn.Sequential(
            nn.Conv2d(3, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, 2 * c, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(2 * c, 4 * c, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(4 * c, 10))
        x = torch.randn(batch, 3, size, size, generator=g)
    else:
        raise ValueError(f"model must be mlp, transformer or cnn, got {name!r}")
    return net, x, torch.randint(0, 10, (len(x),), generator=g)


class BenchModule(pl.LightningModule):
    """Classification with Adam; ``hand_l1`` adds ``alpha * sum(p.abs().sum())`` to the loss as users write it."""

    def __init__(self, net: nn.Module, optimizer: str = "adam", weight_decay: float = 0.0, hand_l1: float = 0.0):
        super().__init__()
        self.net, self.optimizer_name, self.weight_decay, self.hand_l1 = net, optimizer, weight_decay, hand_l1
        self.penalised = [p for _, p in select_parameters(self)]

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        if self.hand_l1:
            loss = loss + self.hand_l1 * sum(p.abs().sum() for p in self.penalised)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        cls = torch.optim.AdamW if self.optimizer_name == "adamw" else torch.optim.Adam
        return cls(self.parameters(), lr=LR, weight_decay=self.weight_decay)


class MemoryLogger(Logger):
    """A Lightning logger that keeps rows in memory, so logging costs what the callbacks make it cost."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict[str, float]] = []

    name = "bench"  # type: ignore[assignment]
    version = 0  # type: ignore[assignment]

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.rows.append(dict(metrics))

    def log_hyperparams(self, *args: Any, **kwargs: Any) -> None:
        pass


class Floor(Callback):
    """The least any penalty must cost: one in-place read-modify-write pass (``w *= 1``) after each step."""

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.params = [p for _, p in select_parameters(pl_module)]
        self.handle = trainer.optimizers[0].register_step_post_hook(self._post_step_hook)

    @torch.no_grad()
    def _post_step_hook(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        torch._foreach_mul_(self.params, 1.0)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.handle.remove()


def configurations() -> dict[str, dict[str, Any]]:
    """name -> how to build it: ``callback`` factory and/or ``module`` keyword arguments."""
    configs: dict[str, dict[str, Any]] = {"none": {}, "floor": {"callback": Floor}}
    for pname, make in PENALTIES.items():
        for mode in MODES:
            configs[f"{pname}/{mode}"] = {"callback": functools.partial(lambda m, mode: Regularizer(m(), mode=mode), make, mode)}
    monitor = getattr(lightreg, "WeightMonitor", None)
    if monitor is not None:
        configs["monitor/every_step"] = {"callback": lambda: monitor(every_n_steps=1)}
        configs["monitor/default"] = {"callback": monitor}
    configs["hand_l1_in_loss"] = {"module": {"hand_l1": ALPHA}}
    configs["adam_weight_decay"] = {"module": {"weight_decay": ALPHA}}
    configs["adamw"] = {"module": {"optimizer": "adamw", "weight_decay": ALPHA}}
    return configs


# ---- measurement ---------------------------------------------------------------------------------
def memory_peak_cpu(prof: torch.profiler.profile) -> int:
    """Peak of the running sum of torch allocator events (bytes allocated minus freed) in a profile."""
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    running = peak = 0
    for e in events:
        running += e.self_cpu_memory_usage
        peak = max(peak, running)
    return peak


class MemoryWindow:
    """Peak bytes allocated (over the level at entry) inside a ``with`` block, CPU or CUDA."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.peak = device, 0

    def __enter__(self) -> MemoryWindow:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.start = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
            self.prof.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.start
        else:
            self.prof.__exit__(*exc)
            self.peak = memory_peak_cpu(self.prof)


@dataclass
class Probe:
    """Step timings and memory of one fit; filled by ``StepTimer`` and the wrapped callback methods."""

    clock: Any
    device: torch.device
    first_timed: int
    memory: bool
    step_start: float | None = None
    step: int = -1
    in_hooks: float = 0.0
    depth: int = 0
    steps: list[float] = field(default_factory=list)
    hooks: list[float] = field(default_factory=list)
    step_peak: int = 0
    hook_peak: int = 0
    window: MemoryWindow | None = None

    def now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return self.clock()


class StepTimer(Callback):
    """First callback of every fit: closes the previous step's timing at each batch start."""

    def __init__(self, probe: Probe) -> None:
        self.probe = probe

    def _close_step(self) -> None:
        p = self.probe
        if p.window is not None:
            p.window.__exit__(None, None, None)
            p.step_peak, p.window = p.window.peak, None
        if p.step_start is not None and p.step >= p.first_timed:
            p.steps.append(p.now() - p.step_start)
            p.hooks.append(p.in_hooks)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        p = self.probe
        self._close_step()
        p.step, p.in_hooks = trainer.global_step, 0.0
        if p.memory and p.step == p.first_timed - 2:  # one whole step profiled, before the timed window
            p.window = MemoryWindow(p.device).__enter__()
        p.step_start = p.now()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close_step()


_ONE_OFF = {"setup", "teardown", "on_fit_start", "on_fit_end", "on_train_start", "on_train_end", "state_dict",
            "load_state_dict", "on_save_checkpoint", "on_load_checkpoint", "state_key", "on_exception"}


def instrument(callback: Callback, probe: Probe) -> Callback:
    """Time every method the callback's own classes define (outermost call only) while steps run.

    On the step after the profiled whole step, each outermost call also records its peak temporaries.
    """
    for cls in type(callback).__mro__:
        if cls in (Callback, object):
            break
        for name, fn in vars(cls).items():
            if name in _ONE_OFF or name.startswith("__") or not inspect.isfunction(fn) or name in vars(callback):
                continue
            callback.__dict__[name] = _timed(getattr(callback, name), probe)
    return callback


def _timed(method: Any, probe: Probe) -> Any:
    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if probe.depth or probe.step_start is None:
            return method(*args, **kwargs)
        probe.depth += 1
        try:
            window = MemoryWindow(probe.device) if probe.memory and probe.step == probe.first_timed - 1 else None
            start = probe.now()
            if window is None:
                return method(*args, **kwargs)
            with window:
                result = method(*args, **kwargs)
            probe.hook_peak = max(probe.hook_peak, window.peak)
            return result
        finally:
            probe.in_hooks += probe.now() - start
            probe.depth -= 1

    return wrapper


def run_fit(model_name: str, config: dict[str, Any], args: argparse.Namespace, memory: bool) -> Probe:
    """One fit of ``warmup + 2 + steps`` steps; the last ``steps`` are timed."""
    net, x, y = make_model(model_name, args.quick)
    device = torch.device(args.device)
    module = BenchModule(net, **config.get("module", {}))
    first_timed = args.warmup + 2
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    probe = Probe(clock=clock, device=device, first_timed=first_timed, memory=memory)
    callbacks: list[Callback] = [StepTimer(probe)]
    if "callback" in config:
        callbacks.append(instrument(config["callback"](), probe))
    n = first_timed + args.steps
    loader = DataLoader(TensorDataset(x.repeat(n, *[1] * (x.ndim - 1)), y.repeat(n)), batch_size=len(x))
    trainer = pl.Trainer(
        accelerator=device.type, devices=1, max_steps=n, logger=MemoryLogger(), callbacks=callbacks,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, loader)
    return probe


def largest_penalised_bytes(model_name: str, quick: bool) -> int:
    net, _, _ = make_model(model_name, quick)
    return max(p.numel() * p.element_size() for _, p in select_parameters(net))


def bench_model(model_name: str, configs: dict[str, dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    names = list(configs)
    rounds: list[dict[str, Probe]] = []
    order_rng = random.Random(0)
    for r in range(args.rounds):
        order = names[:]
        order_rng.shuffle(order)
        rounds.append({name: run_fit(model_name, configs[name], args, memory=(r == 0)) for name in order})
        print(f"  {model_name}: round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    # Per round: the mean step of each fit, relative to the plain fit of the same round.
    step = {n: statistics.median(statistics.fmean(rd[n].steps) for rd in rounds) for n in names}
    ratio = {n: statistics.median(statistics.fmean(rd[n].steps) / statistics.fmean(rd["none"].steps) for rd in rounds)
             for n in names}
    hooks = {n: statistics.median(statistics.fmean(rd[n].hooks) for rd in rounds) for n in names}
    base, largest = step["none"], largest_penalised_bytes(model_name, args.quick)
    rows = {}
    for n in names:
        has_hooks = "callback" in configs[n]
        added = hooks[n] if has_hooks else (ratio[n] - 1.0) * base
        first = rounds[0][n]
        extra_step = max(first.step_peak - rounds[0]["none"].step_peak, 0)
        rows[n] = {
            "step_ms": 1e3 * step[n], "step_ratio": ratio[n], "added_ms": 1e3 * added, "added_pct": 100 * added / base,
            "added_from": "hooks" if has_hooks else "step difference",
            "x_floor": added / hooks["floor"] if has_hooks and hooks["floor"] > 0 else None,
            "extra_step_bytes": extra_step, "extra_hook_bytes": first.hook_peak if has_hooks else None,
            "extra_bytes": max(extra_step, first.hook_peak if has_hooks else 0),
            "extra_over_largest": max(extra_step, first.hook_peak if has_hooks else 0) / largest,
        }
    return {"largest_penalised_bytes": largest, "configs": rows}


# ---- report --------------------------------------------------------------------------------------
def targets(results: dict[str, Any]) -> list[tuple[str, bool, str]]:
    """The issue's targets, checked on the MLP (regularizer time) and on every model (memory)."""
    checks = []
    mlp = results["models"].get("mlp", {}).get("configs", {})
    regs = {n: r for n, r in mlp.items() if n.split("/")[0] in PENALTIES}
    if regs:
        worst = max(regs, key=lambda n: regs[n]["added_pct"])
        checks.append(("every Regularizer mode <= 5% of the MLP step", regs[worst]["added_pct"] <= 5,
                       f"worst {worst}: {regs[worst]['added_pct']:.2f}%"))
        worst = max(regs, key=lambda n: regs[n]["x_floor"])
        checks.append(("every Regularizer mode <= 2x the floor (MLP)", regs[worst]["x_floor"] <= 2,
                       f"worst {worst}: {regs[worst]['x_floor']:.2f}x"))
    for name, limit in (("monitor/default", 1.0), ("monitor/every_step", 20.0)):
        if name in mlp:
            checks.append((f"{name} <= {limit:g}% of the MLP step", mlp[name]["added_pct"] <= limit,
                           f"{mlp[name]['added_pct']:.2f}%"))
    worst = max(((m, n, r) for m, res in results["models"].items() for n, r in res["configs"].items()
                 if "callback" in results["config_kinds"][n]), key=lambda t: t[2]["extra_over_largest"])
    within = worst[2]["extra_bytes"] <= results["models"][worst[0]]["largest_penalised_bytes"] + SLACK_BYTES
    checks.append(("callback extra memory <= largest penalised tensor", within,
                   f"worst {worst[0]} {worst[1]}: {worst[2]['extra_over_largest']:.2f}x"))
    return checks


def format_table(results: dict[str, Any]) -> str:
    out = []
    for model, res in results["models"].items():
        out.append(f"\n### {model} (largest penalised tensor {res['largest_penalised_bytes'] / 2**20:.2f} MiB)\n")
        out.append("| configuration | step ms | x none | added ms | added % | x floor | extra MiB step / hooks | extra / largest |")
        out.append("|---|---:|---:|---:|---:|---:|---:|---:|")
        for n, r in res["configs"].items():
            xf = f"{r['x_floor']:.2f}" if r["x_floor"] is not None else "-"
            hook = f"{r['extra_hook_bytes'] / 2**20:.2f}" if r["extra_hook_bytes"] is not None else "-"
            mark = "" if r["added_from"] == "hooks" else " †"
            out.append(f"| {n} | {r['step_ms']:.2f} | {r['step_ratio']:.3f} | {r['added_ms']:.3f}{mark} | "
                       f"{r['added_pct']:.2f}{mark} | {xf} | {r['extra_step_bytes'] / 2**20:.2f} / {hook} | "
                       f"{r['extra_over_largest']:.2f} |")
    out.append("\n† no callback: the difference of the step times (Trainer-level), not a direct measurement.")
    out.append("\n| target | met | measured |\n|---|---|---|")
    out += [f"| {t} | {'yes' if ok else 'NO'} | {m} |" for t, ok, m in results["targets"]]
    return "\n".join(out)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny models, one round, few steps (a smoke run)")
    p.add_argument("--models", default="mlp,transformer,cnn", help="comma-separated subset of mlp,transformer,cnn")
    p.add_argument("--configs", default=None, help="comma-separated subset of configurations (none and floor are always run)")
    p.add_argument("--rounds", type=int, default=None, help="rounds of alternating fits (default 3; --quick 1)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per fit (default 50: one monitor interval)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps at the start of each fit")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default 1 on CPU with --clock cpu)")
    p.add_argument("--clock", choices=("cpu", "wall"), default=None, help="thread CPU time (CPU default) or wall time")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default=None, help="also write the results as JSON to this path")
    args = p.parse_args(argv)
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.steps = args.steps or (3 if args.quick else 50)
    args.clock = args.clock or ("cpu" if args.device == "cpu" and (args.threads or 1) == 1 else "wall")
    if args.clock == "cpu" and args.device != "cpu":
        p.error("--clock cpu measures host CPU time; use --clock wall on CUDA")
    args.threads = args.threads or (1 if args.clock == "cpu" else torch.get_num_threads())
    if args.clock == "cpu" and args.threads != 1:
        p.error("--clock cpu counts one thread's CPU time; it needs --threads 1 (or use --clock wall)")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    configs = configurations()
    if args.configs:
        wanted = set(args.configs.split(",")) | {"none", "floor"}
        unknown = wanted - set(configs)
        if unknown:
            raise SystemExit(f"unknown --configs {sorted(unknown)}; known: {list(configs)}")
        configs = {n: c for n, c in configs.items() if n in wanted}
    env = {"device": torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({torch.get_num_threads()} torch threads, "
           f"{len(__import__('os').sched_getaffinity(0))} cores visible)", "torch": torch.__version__, "lightning": pl.__version__,
           "clock": args.clock, "rounds": args.rounds, "timed_steps": args.steps, "alpha": ALPHA, "lr": LR,
           "optimizer": "Adam", "monitor_available": hasattr(lightreg, "WeightMonitor")}
    results: dict[str, Any] = {"env": env, "models": {}, "config_kinds": {n: sorted(c) for n, c in configs.items()}}
    for model in args.models.split(","):
        results["models"][model] = bench_model(model, configs, args)
    results["targets"] = targets(results)
    print(f"env: {json.dumps(env)}")
    print(format_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
