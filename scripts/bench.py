#!/usr/bin/env python
"""What regularization costs a Lightning training step, against every alternative and against the floor.

All configurations of a model run inside ONE real ``lightning.Trainer.fit`` with the real callbacks
attached, and take turns step by step: every cycle of steps gives each configuration one step, in a
shuffled order, and a configuration's callback only runs on its own steps (the others' calls return at
once). Drift of a shared machine, and the memory layout of the fit, then hit all of them alike. Per
configuration and model it reports:

* ``step``: the median training step (Trainer-level, batch start to batch start) and its ratio to the
  median unregularized step;
* ``added``: the median time spent inside the callback's own methods on its steps (every method the
  callback class defines, counted once at the outermost call) as a share of the plain step and as a
  multiple of the **floor** (one in-place read-modify-write pass over the penalised tensors, itself a
  callback). The WeightMonitor at its default interval is amortized: (a logging step's cost + the
  cost of ``n - 1`` idle steps) / ``n``. Without a callback (hand-written loss term, optimizer weight
  decay) ``added`` is the difference of the median steps;
* ``extra``: the peak memory a configuration adds: of one whole step over the plain step's peak, and of
  the temporaries inside the callback's own calls, against the largest penalised tensor.

On CPU memory comes from ``torch.profiler`` allocation events (torch's allocator, which tracemalloc does
not see); on CUDA from ``torch.cuda.max_memory_allocated``. The default clock on CPU is the thread's CPU
time with one torch thread: time other processes take from the machine is not counted, which keeps
ratios stable on shared cores. ``--clock wall --threads 2`` measures wall time on both cores instead.

The tables lead with the DEFAULT configuration, ``Regularizer(penalty)`` (proximal, preconditioned), per optimizer:
Adam (every configuration) and SGD with momentum 0.9 (a second fit: the defaults, the hand-written penalty and the
floor). The fused kernels are built before the timed steps (a fit builds them at its first step)
(``lightreg.proximal.fused_prox``); ``l1/proximal_eager`` is the same default without them (no C compiler).

Run ``python scripts/bench.py`` (a few minutes), ``--quick`` for a smoke run, ``--json out.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import inspect
import json
import logging
import os
import random
import statistics
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightreg.proximal.fused_prox as fused_prox
import lightreg.penalties.mode_kernels as mode_kernels
import lightreg.proximal.fused_group_prox as fused_group_prox
from lightreg.proximal import elementwise_kernel, group_prox_kernel
from lightreg.proximal.adaptive_step import AdaptiveStep
from lightreg import L0, L1, L2, ElasticNet, GroupLasso, Regularizer, WeightMonitor
from lightreg.model.selection import select_parameters

ALPHA, LR = 1e-4, 1e-3
#: The optimizers of the fits: Adam for every configuration, SGD with momentum for the defaults.
OPTIMIZERS = {"adam": ("Adam", lambda ps: torch.optim.Adam(ps, lr=LR)),
              "sgd": ("SGD, momentum 0.9", lambda ps: torch.optim.SGD(ps, lr=0.01, momentum=0.9))}
#: The rows each optimizer's fit runs besides the defaults (None: every configuration).
SGD_ROWS = ("none", "floor", "hand_l1_in_loss")
PENALTIES = {"l1": lambda: L1(ALPHA), "l2": lambda: L2(ALPHA), "elastic_net": lambda: ElasticNet(ALPHA, 0.5),
             "group_lasso": lambda: GroupLasso(ALPHA, dim=0), "l0": lambda: L0(ALPHA)}
MODES = ("gradient", "decoupled", "proximal")
#: Extra Regularizer rows: the plain-lr prox (the preconditioned one is the default with Adam), and target
#: sparsity with the level selected at every step (a ramp over the whole fit, never frozen) or every 10th.
TARGET = dict(target_sparsity=0.9, target_ramp=(0, 1.0), target_debias=0)
EXTRA_ROWS = {
    "l1/proximal_lr": ("l1", dict(preconditioned=False)),
    "group_lasso/proximal_lr": ("group_lasso", dict(preconditioned=False)),
    "l1/target": ("l1", TARGET), "l0/target": ("l0", TARGET), "group_lasso/target": ("group_lasso", TARGET),
    "l1/target_every10": ("l1", dict(TARGET, target_every=10)),
    "l1/proximal_eager": ("l1", dict(eager=True)),
}


def default_rows() -> list[str]:
    """The default configuration of each penalty, ``Regularizer(penalty)``: the rows every table leads with."""
    return [f"{p}/proximal" for p in PENALTIES]


#: The switches of every fused kernel: (module, threshold name). The eager rows set them all to inf.
KERNEL_SWITCHES = ((fused_prox, "BUILD_AFTER_ELEMENTS"), (fused_prox, "COMPILE_AFTER_ELEMENTS"),
                   (fused_group_prox, "BUILD_AFTER_ELEMENTS"), (mode_kernels, "BUILD_AFTER_ELEMENTS"))


class EagerRegularizer(Regularizer):
    """The default Regularizer with no fused kernel: the eager reference (what a machine without a C compiler runs)."""

    @torch.no_grad()
    def apply_proximal(self, optimizer: torch.optim.Optimizer, alpha: float) -> None:
        saved = [getattr(module, name) for module, name in KERNEL_SWITCHES]
        for module, name in KERNEL_SWITCHES:
            setattr(module, name, float("inf"))
        try:
            super().apply_proximal(optimizer, alpha)
        finally:
            for (module, name), value in zip(KERNEL_SWITCHES, saved):
                setattr(module, name, value)
#: Scalar bookkeeping tensors (a step count, an lr) that the memory target does not count.
SLACK_BYTES = 1024
#: The k-th level's radix selection: a histogram of 65537 int64 counters, and bincount's own output on CPU.
SELECTION_BYTES = 2 * 8 * 65537
#: GroupLasso's per-coordinate prox keeps a few per-group vectors (radius, sums, flags) besides its temporary.
GROUP_VECTOR_BYTES = 16 * 1024


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
        d, n_layers, seq, batch = (16, 1, 4, 4) if quick else (128, 6, 32, 16)
        layer = nn.TransformerEncoderLayer(d, nhead=4, dim_feedforward=2 * d, dropout=0.0, batch_first=True)
        net = nn.Sequential(nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False),
                            nn.Flatten(), nn.Linear(seq * d, 10))
        x = torch.randn(batch, seq, d, generator=g)
    elif name == "cnn":
        c, size, batch = (4, 8, 4) if quick else (32, 32, 32)
        net = nn.Sequential(
            nn.Conv2d(3, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, 2 * c, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(2 * c, 4 * c, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(4 * c, 10))
        x = torch.randn(batch, 3, size, size, generator=g)
    else:
        raise ValueError(f"model must be mlp, transformer or cnn, got {name!r}")
    return net, x, torch.randint(0, 10, (len(x),), generator=g)


@dataclass
class Probe:
    """Which configuration owns the current step, and what its steps and callback calls cost."""

    plan: list[str]
    first_timed: int
    clock: Any = time.thread_time
    device: torch.device = torch.device("cpu")
    memory_cycle: dict[int, str] = field(default_factory=dict)  # step -> "step" or "hooks" profile
    active: str | None = None
    step: int = -1
    step_start: float | None = None
    in_hooks: float = 0.0
    depth: int = 0
    steps: dict[str, list[float]] = field(default_factory=dict)
    hooks: dict[str, list[float]] = field(default_factory=dict)
    step_peak: dict[str, int] = field(default_factory=dict)
    hook_peak: dict[str, int] = field(default_factory=dict)
    window: MemoryWindow | None = None

    def now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return self.clock()


def make_plan(names: list[str], warmup: int, cycles: int, seed: int = 0) -> list[str]:
    """``warmup`` plain steps, then ``cycles`` cycles in which each configuration has one step, shuffled."""
    rng, plan = random.Random(seed), ["none"] * warmup
    for _ in range(cycles):
        order = names[:]
        rng.shuffle(order)
        plan += order
    return plan


class BenchModule(pl.LightningModule):
    """Classification with Adam; on ``hand_l1_in_loss`` steps the loss gets ``alpha * sum(p.abs().sum())``.

    The optimizer's own weight decay is switched per step through its param group: ``weight_decay``
    (Adam's, coupled) or with ``decoupled_weight_decay`` (exactly ``torch.optim.AdamW``).
    """

    def __init__(self, net: nn.Module, probe: Probe, optimizer: str = "adam") -> None:
        super().__init__()
        self.net, self.probe, self.optimizer_name = net, probe, optimizer
        self.penalised = [p for _, p in select_parameters(self)]

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        if self.probe.active == "hand_l1_in_loss":  # what users write today
            loss = loss + ALPHA * sum(p.abs().sum() for p in self.penalised)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return OPTIMIZERS[self.optimizer_name][1](self.parameters())


def set_weight_decay(optimizer: torch.optim.Optimizer, active: str | None) -> None:
    for group in optimizer.param_groups:
        group["weight_decay"] = ALPHA if active in ("adam_weight_decay", "adamw") else 0.0
        group["decoupled_weight_decay"] = active == "adamw"


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


CALLBACK_FREE = ("none", "hand_l1_in_loss", "adam_weight_decay", "adamw")


def configurations() -> dict[str, Any]:
    """name -> callback factory, or ``None`` for the configurations that need no callback."""
    configs: dict[str, Any] = {"none": None, "floor": Floor}
    for pname, make in PENALTIES.items():
        for mode in MODES if pname != "l0" else ("proximal",):  # L0 has no gradient
            configs[f"{pname}/{mode}"] = functools.partial(
                lambda m, mode, name: Regularizer(m(), mode=mode, name=name), make, mode, f"{pname}_{mode}")
    for row, (pname, kwargs) in EXTRA_ROWS.items():
        kwargs = dict(kwargs)
        cls = EagerRegularizer if kwargs.pop("eager", False) else Regularizer
        configs[row] = functools.partial(lambda c, m, kw, name: c(m(), name=name, **kw), cls, PENALTIES[pname], kwargs,
                                         row.replace("/", "_"))
    configs["monitor/every_step"] = lambda: WeightMonitor(every_n_steps=1)
    configs["monitor/default"] = WeightMonitor
    for name in CALLBACK_FREE[1:]:
        configs[name] = None
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


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """Silence the process's standard error (file descriptor 2, C++ code included) inside the block.

    Each start and stop of the torch profiler writes a ``USDT: ... profiler_start`` line there from C++
    (kineto), whatever the log level: about 160 lines in a run, ahead of the tables.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


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
            with quiet_stderr():
                self.prof.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.start
        else:
            with quiet_stderr():
                self.prof.__exit__(*exc)
            self.peak = memory_peak_cpu(self.prof)


class StepTimer(Callback):
    """First callback of the fit: closes the previous step, then hands the new step to its configuration."""

    def __init__(self, probe: Probe) -> None:
        self.probe = probe

    def _close_step(self) -> None:
        p = self.probe
        if p.window is not None:
            p.window.__exit__(None, None, None)
            p.step_peak[p.active] = min(p.step_peak.get(p.active, p.window.peak), p.window.peak)
            p.window = None
        if p.step_start is not None and p.step >= p.first_timed:
            p.steps.setdefault(p.active, []).append(p.now() - p.step_start)
            p.hooks.setdefault(p.active, []).append(p.in_hooks)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        p = self.probe
        self._close_step()
        p.step, p.in_hooks = trainer.global_step, 0.0
        p.active = p.plan[p.step]
        set_weight_decay(trainer.optimizers[0], p.active)
        if p.memory_cycle.get(p.step) == "step":
            p.window = MemoryWindow(p.device).__enter__()
        p.step_start = p.now()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close_step()
        self.probe.step_start = self.probe.active = None


_ONE_OFF = {"setup", "teardown", "on_fit_start", "on_fit_end", "on_train_start", "on_train_end", "state_dict",
            "load_state_dict", "on_save_checkpoint", "on_load_checkpoint", "state_key", "on_exception"}


def instrument(callback: Callback, name: str, probe: Probe) -> Callback:
    """Run the callback on its own steps only, and time its methods there (outermost call only).

    Every method its own classes define is wrapped (the optimizer hooks it registers included, as they
    are looked up on the instance). On its memory-profiling step each outermost call also records the
    peak of its temporaries.
    """
    for cls in type(callback).__mro__:
        if cls in (Callback, object):
            break
        for attr, fn in vars(cls).items():
            if attr in _ONE_OFF or attr.startswith("__") or not inspect.isfunction(fn) or attr in vars(callback):
                continue
            callback.__dict__[attr] = _timed(getattr(callback, attr), name, probe)
    return callback


def _timed(method: Any, name: str, probe: Probe) -> Any:
    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if probe.depth or probe.step_start is None:  # nested, or outside the steps (fit start/end)
            return method(*args, **kwargs)
        if probe.active != name:
            return None  # another configuration's step: this callback is not there
        probe.depth += 1
        start = probe.now()
        try:
            if probe.memory_cycle.get(probe.step) != "hooks":
                return method(*args, **kwargs)
            with MemoryWindow(probe.device) as window:
                result = method(*args, **kwargs)
            probe.hook_peak[name] = max(probe.hook_peak.get(name, 0), window.peak)
            return result
        finally:
            probe.in_hooks += probe.now() - start
            probe.depth -= 1

    return wrapper


def run_fit(model_name: str, configs: dict[str, Any], args: argparse.Namespace) -> Probe:
    """One fit of the model in which every configuration takes its turns (see ``make_plan``).

    Cycles 0 and 1 profile each configuration's whole step (the smaller peak counts: a one-off
    allocation elsewhere in Lightning then does not), cycle 2 its callback's calls; the rest are timed.
    """
    names = list(configs)
    plan = make_plan(names, args.warmup, 3 + args.cycles)
    probe = Probe(plan=plan, first_timed=args.warmup + 3 * len(names), device=torch.device(args.device),
                  clock=time.thread_time if args.clock == "cpu" else time.perf_counter)
    for step in range(args.warmup, probe.first_timed):
        probe.memory_cycle[step] = "step" if step < args.warmup + 2 * len(names) else "hooks"
    net, x, y = make_model(model_name, args.quick)
    callbacks: list[Callback] = [StepTimer(probe)]
    callbacks += [instrument(factory(), name, probe) for name, factory in configs.items() if factory is not None]
    loader = DataLoader(TensorDataset(x.repeat(len(plan), *[1] * (x.ndim - 1)), y.repeat(len(plan))), batch_size=len(x))
    trainer = pl.Trainer(
        accelerator=probe.device.type, devices=1, max_steps=len(plan), logger=MemoryLogger(), callbacks=callbacks,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(BenchModule(net, probe, args.optimizer), loader)
    return probe


def compile_kernels(device: str) -> None:
    """Build the fused prox kernels before the fits, as a long fit would have: the C kernels on the CPU (about 1 s),
    ``torch.compile`` of both variants on an accelerator (seconds each)."""
    for module, name in KERNEL_SWITCHES:
        setattr(module, name, 0)
    if device == "cpu":  # the C kernels: built once per machine, then loaded
        elementwise_kernel.library(), group_prox_kernel.library()
        return
    for name in fused_prox.EAGER:
        for size in (4096, 4099):  # dynamic shapes: one graph for every size, odd ones included
            w, v = torch.randn(size, device=device), torch.rand(size, device=device) + 1e-3
            v[::7] = 0.0
            fused_prox.fused_prox_(fused_prox.kernel(name), w, AdaptiveStep(LR, v, 0.5, 1e-8, LR), ALPHA, ALPHA)


def largest_penalised_bytes(model_name: str, quick: bool) -> int:
    net, _, _ = make_model(model_name, quick)
    return max(p.numel() * p.element_size() for _, p in select_parameters(net))


def bench_model(model_name: str, configs: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    probe = run_fit(model_name, configs, args)
    med = statistics.median
    step = {n: med(probe.steps[n]) for n in configs}
    added = {n: med(probe.hooks[n]) for n in configs}
    if "monitor/default" in configs:  # amortize: one logging step (the every-step monitor's cost) per interval
        every = WeightMonitor().every_n_steps
        added["monitor/default"] = (added["monitor/every_step"] + (every - 1) * added["monitor/default"]) / every
    base, largest = step["none"], largest_penalised_bytes(model_name, args.quick)
    rows = {}
    for n in configs:
        has_hooks = configs[n] is not None
        cost = added[n] if has_hooks else step[n] - base
        extra_step = max(probe.step_peak.get(n, 0) - probe.step_peak.get("none", 0), 0)
        # A callback's own temporaries are its cost (deterministic); the whole-step delta varies by a
        # few allocator blocks and is what a config without a callback costs (an autograd graph...).
        extra = probe.hook_peak.get(n, 0) if has_hooks else extra_step
        rows[n] = {
            "step_ms": 1e3 * step[n], "step_ratio": step[n] / base, "added_ms": 1e3 * cost, "added_pct": 100 * cost / base,
            "added_from": "hooks" if has_hooks else "step difference",
            "x_floor": cost / added["floor"] if has_hooks and added["floor"] > 0 else None,
            "extra_step_bytes": extra_step, "extra_hook_bytes": probe.hook_peak.get(n, 0) if has_hooks else None,
            "extra_bytes": extra, "extra_over_largest": extra / largest, "samples": len(probe.steps[n]),
        }
    return {"largest_penalised_bytes": largest, "configs": rows}


# ---- report --------------------------------------------------------------------------------------
def targets(results: dict[str, Any]) -> list[tuple[str, bool, str]]:
    """The performance targets, checked on the MLP (regularizer time) and on every model (memory).

    Plain-step rows (modes gradient and decoupled, the plain-lr prox) against the floor; the preconditioned prox
    (the default proximal mode with Adam) computes the step ``t`` (one temporary) and then the prox (at most one
    more); target-sparsity rows are reported, not held to a target (they select a level over all the weights).
    """
    checks = []
    models = results["models"]
    mlp = models.get("mlp", {}).get("configs", {})
    plain = {n: r for n, r in mlp.items() if n.split("/")[0] in PENALTIES and n.split("/")[1] in ("gradient", "decoupled", "proximal_lr")}
    if plain:
        worst = max(plain, key=lambda n: plain[n]["added_pct"])
        checks.append(("every plain-step Regularizer mode <= 5% of the MLP step", plain[worst]["added_pct"] <= 5,
                       f"worst {worst}: {plain[worst]['added_pct']:.2f}%"))
        worst = max(plain, key=lambda n: plain[n]["x_floor"])
        checks.append(("every plain-step Regularizer mode <= 2x the floor (MLP)", plain[worst]["x_floor"] <= 2,
                       f"worst {worst}: {plain[worst]['x_floor']:.2f}x"))
    defaults = {n: mlp[n] for n in ("l1/proximal", "l2/proximal", "elastic_net/proximal", "l0/proximal") if n in mlp}
    if defaults:
        worst = max(defaults, key=lambda n: defaults[n]["added_pct"])
        checks.append(("default prox with Adam (L1, L2, ElasticNet, L0) <= 5% of the MLP step",
                       defaults[worst]["added_pct"] <= 5, f"worst {worst}: {defaults[worst]['added_pct']:.2f}%"))
        worst = max(defaults, key=lambda n: defaults[n]["x_floor"])
        checks.append(("default prox with Adam <= 4x the floor (MLP)", defaults[worst]["x_floor"] <= 4,
                       f"worst {worst}: {defaults[worst]['x_floor']:.2f}x"))
        if "hand_l1_in_loss" in mlp:
            hand = mlp["hand_l1_in_loss"]["added_pct"]
            worst = max(defaults, key=lambda n: defaults[n]["added_pct"])
            checks.append(("default prox with Adam below the hand-written L1 of the same run",
                           defaults[worst]["added_pct"] < hand, f"worst {worst}: {defaults[worst]['added_pct']:.2f}% vs {hand:.2f}%"))
    if "group_lasso/proximal" in mlp:
        checks.append(("default GroupLasso with Adam <= 10% of the MLP step", mlp["group_lasso/proximal"]["added_pct"] <= 10,
                       f"{mlp['group_lasso/proximal']['added_pct']:.2f}%"))
    for name, limit in (("monitor/default", 1.0), ("monitor/every_step", 20.0)):
        if name in mlp:
            checks.append((f"{name} <= {limit:g}% of the MLP step", mlp[name]["added_pct"] <= limit,
                           f"{mlp[name]['added_pct']:.2f}%"))
    groups = (("plain-step Regularizer", 1, lambda n: n.split("/")[0] in PENALTIES
               and n.split("/")[1] not in ("proximal", "proximal_eager") and "target" not in n),
              ("preconditioned prox (Adam)", 2, lambda n: n.split("/")[0] in PENALTIES
               and n.split("/")[1] in ("proximal", "proximal_eager")),
              ("target sparsity", 2, lambda n: "target" in n),  # + the level histograms (SELECTION_BYTES)
              ("WeightMonitor", 1, lambda n: n.startswith("monitor")))
    for label, times, member in groups:
        rows = [(m, n, r) for m, res in models.items() for n, r in res["configs"].items() if member(n)]
        if rows:
            m, n, r = max(rows, key=lambda t: t[2]["extra_over_largest"])
            slack = SLACK_BYTES + {"target sparsity": SELECTION_BYTES, "preconditioned prox (Adam)": GROUP_VECTOR_BYTES}.get(label, 0)
            within = r["extra_hook_bytes"] <= times * models[m]["largest_penalised_bytes"] + slack
            checks.append((f"{label} temporaries <= {times} x largest penalised tensor (+{slack:,} B)", within,
                           f"worst {m} {n}: {r['extra_over_largest']:.3f}x"))
    return checks


def ordered(names: list[str]) -> list[str]:
    """The defaults first, then the hand-written penalty, the floor and the plain step, then the rest as run."""
    lead = [n for n in [*default_rows(), "hand_l1_in_loss", "floor", "none"] if n in names]
    return lead + [n for n in names if n not in lead]


def format_defaults(results: dict[str, Any]) -> str:
    """The headline table: what ``Regularizer(penalty)`` costs with each optimizer, next to the hand-written
    penalty and the floor."""
    out = ["| model, optimizer | configuration | added to the step | x floor |", "|---|---|---:|---:|"]
    for model, res in results["models"].items():
        rows = res["configs"]
        label = f"{model.split('/')[0]}, {res.get('optimizer', 'Adam')}"
        for n in [*default_rows(), "hand_l1_in_loss", "floor"]:
            if n in rows:
                what = {"hand_l1_in_loss": "hand-written `loss + alpha * sum(p.abs().sum())`",
                        "floor": "floor: one in-place pass over the penalised weights"}.get(n, f"`Regularizer({n.split('/')[0]})` (default)")
                xf = f"{rows[n]['x_floor']:.2f}" if rows[n]["x_floor"] is not None else ""
                out.append(f"| {label} | {what} | {rows[n]['added_pct']:.2f} % | {xf} |")
    return "\n".join(out)


def format_table(results: dict[str, Any]) -> str:
    out = ["\n### Defaults\n", format_defaults(results)]
    for model, res in results["models"].items():
        out.append(f"\n### {model} (largest penalised tensor {res['largest_penalised_bytes'] / 2**10:,.1f} KiB)\n")
        out.append("| configuration | step ms | x none | added ms | added % | x floor | extra MiB step / callback | extra / largest |")
        out.append("|---|---:|---:|---:|---:|---:|---:|---:|")
        for n in ordered(list(res["configs"])):
            r = res["configs"][n]
            xf = f"{r['x_floor']:.2f}" if r["x_floor"] is not None else "-"
            hook = f"{r['extra_hook_bytes'] / 2**20:.2f}" if r["extra_hook_bytes"] is not None else "-"
            mark = "" if r["added_from"] == "hooks" else " †"
            out.append(f"| {n} | {r['step_ms']:.2f} | {r['step_ratio']:.3f} | {r['added_ms']:.3f}{mark} | "
                       f"{r['added_pct']:.2f}{mark} | {xf} | {r['extra_step_bytes'] / 2**20:.2f} / {hook} | "
                       f"{r['extra_over_largest']:.2f} |")
    out.append("\n† no callback: the difference of the median steps (Trainer-level); its extra memory is the whole "
               "step's over the plain step's. With a callback, extra / largest is the callback's own temporaries.")
    out.append("\n| target | met | measured |\n|---|---|---|")
    out += [f"| {t} | {'yes' if ok else 'NO'} | {m} |" for t, ok, m in results["targets"]]
    return "\n".join(out)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny models, one round, few steps (a smoke run)")
    p.add_argument("--models", default="mlp,transformer,cnn", help="comma-separated subset of mlp,transformer,cnn")
    p.add_argument("--configs", default=None, help="comma-separated subset of configurations (none and floor are always run)")
    p.add_argument("--cycles", type=int, default=None, help="timed steps per configuration (default 30; --quick 2)")
    p.add_argument("--warmup", type=int, default=3, help="untimed plain steps at the start of each fit")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default 1 on CPU with --clock cpu)")
    p.add_argument("--clock", choices=("cpu", "wall"), default=None, help="thread CPU time (CPU default) or wall time")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default=None, help="also write the results as JSON to this path")
    p.add_argument("--optimizers", default="adam,sgd", help="adam (every configuration), sgd (momentum 0.9: the defaults)")
    p.add_argument("--eager", action="store_true", help="no fused kernels: the eager reference everywhere (a machine without a C compiler)")
    args = p.parse_args(argv)
    args.cycles = args.cycles or (2 if args.quick else 30)
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
    warnings.filterwarnings("ignore", ".*smaller than the logging interval.*")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    configs = configurations()
    if args.configs:
        wanted = set(args.configs.split(",")) | {"none", "floor"}
        if "monitor/default" in wanted:  # its logging step is measured by the every-step monitor
            wanted.add("monitor/every_step")
        unknown = wanted - set(configs)
        if unknown:
            raise SystemExit(f"unknown --configs {sorted(unknown)}; known: {list(configs)}")
        configs = {n: c for n, c in configs.items() if n in wanted}
    env = {"device": torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({torch.get_num_threads()} torch threads, "
           f"{os.cpu_count()} cores)", "torch": torch.__version__, "lightning": pl.__version__,
           "clock": args.clock, "timed_steps_per_config": args.cycles, "alpha": ALPHA, "lr": LR,
           "optimizers": [OPTIMIZERS[o][0] for o in args.optimizers.split(",")],
           "fused_kernels": "eager (--eager)" if args.eager else "built before the fit (C on the CPU, torch.compile on an accelerator)"}
    results: dict[str, Any] = {"env": env, "models": {}}
    if args.eager:
        for module, name in KERNEL_SWITCHES:
            setattr(module, name, float("inf"))
    else:
        start = time.perf_counter()
        compile_kernels(args.device)
        env["compile_s"] = round(time.perf_counter() - start, 1)
    for model in args.models.split(","):
        for optimizer in args.optimizers.split(","):
            args.optimizer = optimizer
            rows = configs if optimizer == "adam" else {n: c for n, c in configs.items() if n in SGD_ROWS or n in default_rows()}
            key = model if optimizer == "adam" else f"{model}/{optimizer}"
            results["models"][key] = bench_model(model, rows, args)
            results["models"][key]["optimizer"] = OPTIMIZERS[optimizer][0]
    results["targets"] = targets(results)
    print(f"env: {json.dumps(env)}")
    print(format_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
