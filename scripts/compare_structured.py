#!/usr/bin/env python
"""Structured sparsity: lightreg's coupled group lasso + shrink against Torch-Pruning and Lightning's ModelPruning.

Same data (scikit-learn's 8x8 digits: a stratified 80/20 split, pixels standardised on the training part), model,
optimizer (SGD, lr 0.01, momentum 0.9, batch 64), epochs and seeds for every method:

* ``dense``: no penalty (the reference);
* ``lightreg``: ``CoupledGroupLasso`` with a target: ``Regularizer(..., target_sparsity=target)`` written out with
  ``lightreg.proximal.target.TargetSparsity`` on the same SGD loop (prox step ``t = lr / (1 - momentum)``, as the
  ``Regularizer`` takes for SGD), the target counted in parameters (``ParameterBudget``: the fewest coupled groups,
  in increasing order of zero level, that cut ``target`` of the parameters), the cubic ramp, the level selected
  every ``every`` steps with the zeros held between, then the zeros frozen and the penalty off (``RECIPES``);
* ``lightreg-l0``: the same with ``CoupledGroupL0`` (a hard threshold on groups: the survivors are not shrunk);
* ``tp-groupnorm``: Torch-Pruning's ``GroupNormPruner`` sparse training (``pruner.regularize(model)`` after every
  backward, ``reg`` = ``TP_REG``, its default group-norm importance);
* ``modelpruning``: ``torch.nn.utils.prune.ln_structured`` (L2, dim 0: whole filters), which Lightning's
  ``ModelPruning(pruning_fn="ln_structured")`` applies, at every epoch end over the first half of the epochs, ramping
  linearly to the share of filters that removes the target share of parameters.

Then every method is cut the same way to the same parameter reduction: coupled groups (``lightreg.model.dependency_groups``)
in increasing order of the method's own score (the coupled group norm for lightreg and Torch-Pruning, the filter
norm that ``ln_structured`` ranks by for ModelPruning) are zeroed until the parameters left are at most
``1 - target`` of the dense model, and ``lightreg.shrink`` removes them physically (Torch-Pruning's surgery). The
table gives the test accuracy before the cut, right after it, and after ``--finetune`` epochs of plain SGD on the
shrunk model; the largest change of the logits at the cut over the test set, relative to the largest logit; and the shrunk model's forward time
(batch 256, median of 50 passes; every run uses one torch thread).

lightreg's recipes (``RECIPES``: where the ramp starts and ends, how often the level is selected) were chosen with
``--tune`` on a validation split (a quarter of the training part; the test set untouched), seed 0, by the mean
validation accuracy after fine-tuning over the four settings. Torch-Pruning's ``reg`` and ModelPruning's schedule
were not tuned.

    python scripts/compare_structured.py --jobs 2      # 2 models x 2 targets x 2 seeds: 36 runs, 10-40 min on 2 cores
    python scripts/compare_structured.py --quick       # a smoke run, seconds
    python scripts/compare_structured.py --tune --methods lightreg-l0 --seeds 0 --jobs 2 \
        --recipes '{"ramp": 0.5, "freeze": 0.5}' '{"start": 0.2, "ramp": 0.6, "freeze": 0.6}'
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path
from statistics import mean

import torch
import torch_pruning as tp
from torch import nn
from torch.nn.utils import prune

from lightreg import CoupledGroupL0, CoupledGroupLasso, coupled_groups, shrink
from lightreg.proximal.target import TargetSparsity
from lightreg.surgery.cost import forward_time

METHODS = ("dense", "lightreg", "lightreg-l0", "tp-groupnorm", "modelpruning")
LR, MOMENTUM, BATCH = 0.01, 0.9, 64
TP_REG = 5e-4  # Torch-Pruning's sparse-training strength in its benchmark scripts (--reg 5e-4)
#: lightreg's recipe, as fractions of the fit: the target ramps over [0, ramp), the zeros are frozen from ``freeze``
#: on (penalty off: plain SGD on the survivors). Chosen on a validation split (``--tune``), not the test set.
RECIPES = {"lightreg": {"ramp": 0.75, "freeze": 0.75},
           "lightreg-l0": {"start": 0.2, "ramp": 0.6, "freeze": 0.6}}


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.short = nn.Sequential() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        return torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))) + self.short(x))


def build(name: str) -> nn.Module:
    if name == "cnn":  # the app's digits CNN (lightreg.app.models.CNN, channels=16), on flat 64-pixel inputs
        return nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
                             nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(512, 10))
    return nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16),
                         nn.ReLU(), Block(16, 16), Block(16, 32, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


def digits(validation: bool = False):
    """Train and test parts; ``validation``: the training part split again 75/25, its second part in the test's place."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.2, stratify=y, random_state=0)
    if validation:
        xtr, xte, ytr, yte = train_test_split(xtr, ytr, test_size=0.25, stratify=ytr, random_state=1)
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
    f = lambda a: torch.tensor((a - mu) / sd, dtype=torch.float32)  # noqa: E731
    return f(xtr), torch.tensor(ytr), f(xte), torch.tensor(yte)


def accuracy(model: nn.Module, x, y) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def fit(model, x, y, epochs, seed, step_hook=None, backward_hook=None, epoch_hook=None):
    """Plain SGD with momentum; the hooks add each method's penalty."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    for epoch in range(epochs):
        model.train()
        for idx in torch.randperm(len(x), generator=g).split(BATCH):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            if backward_hook:
                backward_hook()
            opt.step()
            if step_hook:
                step_hook()
        if epoch_hook:
            epoch_hook(epoch)


class ParameterBudget:
    """A target counted in parameters: the fewest coupled groups, in increasing order of zero level, whose removal
    leaves at most ``1 - fraction`` of the model's parameters (counted as ``cut`` counts them). A mixin for
    ``CoupledGroupLasso`` and ``CoupledGroupL0`` (it overrides their ``groups_to_zero``)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(0.0)  # type: ignore[call-arg]
        self.model, self.total = model, sum(p.numel() for p in model.parameters())

    def groups_to_zero(self, levels, fraction, n):
        families = self.groups.families
        units = [(i, u) for i, f in enumerate(families) for u in range(f.units)]
        dead: list[set[int]] = [set() for _ in families]
        for k, g in enumerate(sorted(range(n), key=lambda g: (float(levels[g]), g))):
            # shrink keeps one (zero) unit of a layer whose every unit died: count it as the cut does
            cut = [d if len(d) < f.units else set(sorted(d)[1:]) for f, d in zip(families, dead, strict=True)]
            if params_left(self.model, families, cut) <= (1 - fraction) * self.total:
                return k
            dead[units[g][0]].add(units[g][1])
        return n


class LassoBudget(ParameterBudget, CoupledGroupLasso):
    pass


class L0Budget(ParameterBudget, CoupledGroupL0):
    pass


KINDS = {"lightreg": LassoBudget, "lightreg-l0": L0Budget}


def train_lightreg(model, x, y, epochs, seed, target, recipe, kind=LassoBudget):
    """``Regularizer(ParameterBudget, target_sparsity=target, target_ramp=(0, ramp), target_debias=1 - freeze)`` written out
    with ``TargetSparsity`` on the same SGD loop: the level selected every ``default_interval`` steps of the ramp (the
    prox at the level that zeroes the ramped share, the zeros held between), then the zeros frozen, penalty off."""
    penalty = kind(model)
    named = penalty.bind(model, [(n, p) for n, p in model.named_parameters() if p.ndim >= 2], x[:8])
    total = epochs * math.ceil(len(x) / BATCH)
    start, ramp_end = round(recipe.get("start", 0.0) * total), round(recipe["ramp"] * total)  # in steps
    state = TargetSparsity(target, ramp=(start, ramp_end), debias=total - max(round(recipe["freeze"] * total), ramp_end),
                           every=recipe.get("every"))
    state.check(penalty, "proximal", None)
    state.setup(total)
    work = [([n for n, _ in named], [p for _, p in named], LR / (1 - MOMENTUM), LR)]  # the Regularizer's SGD step
    steps = iter(range(total))

    def before():  # the step about to run: record the zero pattern to hold, as the Regularizer's pre-step hook
        state.before_step(state.seen, lambda: named)

    def after():
        with torch.no_grad():
            state.prox_after_step(state.count_step(next(steps)), penalty, work, None)
    fit(model, x, y, epochs, seed, backward_hook=before, step_hook=after)
    return penalty


def train(method, name, target, x, y, epochs, seed, recipe=None):
    torch.manual_seed(seed)
    model, example = build(name), x[:8]
    if method.startswith("lightreg"):
        train_lightreg(model, x, y, epochs, seed, target, recipe or RECIPES[method], KINDS[method])
    elif method == "tp-groupnorm":
        pruner = tp.pruner.GroupNormPruner(model, example, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                           reg=TP_REG, ignored_layers=[model[-1]])
        fit(model, x, y, epochs, seed, backward_hook=lambda: pruner.regularize(model))
    elif method == "modelpruning":
        layers = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
        share, ramp = 1 - math.sqrt(1 - target), max(epochs // 2, 1)  # channels x (1 - s)^2 ~ parameters

        def epoch_hook(epoch):
            if epoch < ramp:  # ln_structured composes: the amount is a share of the filters still unpruned
                done, goal = share * epoch / ramp, share * (epoch + 1) / ramp
                for m in layers:
                    prune.ln_structured(m, "weight", amount=(goal - done) / (1 - done), n=2, dim=0)
        fit(model, x, y, epochs, seed, epoch_hook=epoch_hook)
        for m in layers:
            prune.remove(m, "weight")
    else:
        fit(model, x, y, epochs, seed)
    return model.eval()


def scores(method, family):
    if method == "modelpruning":  # the filter norm ln_structured ranks by; its pruned filters are 0
        s = next((s for s in family.slices if s.param is family.root and s.dim == 0), None)
        rows = s.param.detach().index_select(0, s.index).flatten(1).norm(dim=1)
        return torch.zeros(family.units).index_add_(0, s.unit, rows.square()).sqrt()
    return family.squared_norms().sqrt()


def params_left(model, families, dead) -> int:
    """Parameters after removing the ``dead`` units: each tensor keeps its live share along every sliced dim."""
    alive: dict[tuple[int, int], torch.Tensor] = {}
    for f, units in zip(families, dead, strict=True):
        for s in f.slices:
            keep = alive.setdefault((id(s.param), s.dim), torch.ones(s.param.shape[s.dim], dtype=torch.bool))
            keep[s.index[torch.isin(s.unit, torch.tensor(sorted(units), dtype=torch.long))]] = False
    total = 0
    for p in model.parameters():
        n = p.numel()
        for d in range(p.ndim):
            if (id(p), d) in alive:
                n = n * int(alive[(id(p), d)].sum()) // p.shape[d]
        total += n
    return total


def cut(method, model, target, example):
    """Zero the lowest-scored coupled groups until the parameters left are <= (1 - target), then shrink."""
    model = copy.deepcopy(model)
    families = coupled_groups(model, example).families
    budget, dead = (1 - target) * sum(p.numel() for p in model.parameters()), [set() for _ in families]
    order = sorted(((float(v), i, u) for i, f in enumerate(families) for u, v in enumerate(scores(method, f))))
    for _, i, u in order:
        if params_left(model, families, dead) <= budget:
            break
        if len(dead[i]) < families[i].units - 1:  # a layer keeps one unit
            dead[i].add(u)
    with torch.no_grad():
        for f, units in zip(families, dead, strict=True):
            rows = torch.tensor(sorted(units), dtype=torch.long)
            for s in f.slices:
                s.param.index_fill_(s.dim, s.index[torch.isin(s.unit, rows)], 0.0)
    return shrink(model, example)


def run(method, name, target, data, epochs, finetune, seed, recipe=None):
    xtr, ytr, xte, yte = data
    start = time.perf_counter()
    model = train(method, name, target, xtr, ytr, epochs, seed, recipe)
    before = sum(p.numel() for p in model.parameters())
    row = {"method": method, "model": name, "target": target, "seed": seed, "acc_trained": accuracy(model, xte, yte)}
    if method.startswith("lightreg"):
        row["recipe"] = recipe or RECIPES[method]
    if method != "dense":
        small = cut(method, model, target, xtr[:8])
        with torch.no_grad():  # relative to the largest logit: unnormalised CNN logits reach 1e4 and more
            reference = model(xte)
            row["cut_change"] = float((small(xte) - reference).abs().max() / reference.abs().max())
        row["acc_cut"] = accuracy(small, xte, yte)
        fit(small, xtr, ytr, finetune, seed + 1000)
        row["acc_finetuned"] = accuracy(small.eval(), xte, yte)
        model = small
    row["reduction"] = 1 - sum(p.numel() for p in model.parameters()) / before
    row["forward_us"] = 1e6 * forward_time(model.eval(), xte[:256].repeat(1, 1)[:256], repeats=50)
    row["seconds"] = time.perf_counter() - start
    return row


def table(rows):
    lines = ["| model | target | method | params cut | acc trained | acc at cut | acc fine-tuned | logit change at cut | forward (us) |",
             "|---|---|---|---|---|---|---|---|---|"]
    keys = sorted({(r["model"], r["target"], r["method"]) for r in rows}, key=lambda k: (k[0], k[1], METHODS.index(k[2])))
    for model, target, method in keys:
        rs = [r for r in rows if (r["model"], r["target"], r["method"]) == (model, target, method)]
        m = lambda k: mean(r[k] for r in rs) if k in rs[0] else float("nan")  # noqa: E731
        lines.append(f"| {model} | {target:.0%} | {method} | {m('reduction'):.1%} | {m('acc_trained'):.4f} | "
                     f"{m('acc_cut'):.4f} | {m('acc_finetuned'):.4f} | {m('cut_change'):.2g} | {m('forward_us'):.0f} |")
    return "\n".join(lines)


def _run(job):
    torch.set_num_threads(1)
    return run(*job)


def tune(args) -> list[dict]:
    """lightreg's recipe on the validation split (a quarter of the training part, the test set untouched)."""
    data = digits(validation=True)
    recipes = [json.loads(r) for r in args.recipes] if args.recipes else TUNE_RECIPES
    jobs = [(method, name, target, data, args.epochs, args.finetune, seed, recipe) for method in args.methods
            if method.startswith("lightreg")
            for name in args.models for target in args.targets for seed in args.seeds for recipe in recipes]
    rows = _map(jobs, args.jobs)
    for name in args.models:
        for target in args.targets:
            for recipe, method in [(r, m) for r in recipes for m in sorted({x["method"] for x in rows})]:
                rs = [x for x in rows if (x["method"], x["model"], x["target"], x["recipe"]) == (method, name, target, recipe)]
                print(f"{method} {name} {target:.0%} {json.dumps(recipe)}: validation accuracy trained "
                      f"{mean(x['acc_trained'] for x in rs):.4f}, fine-tuned {mean(x['acc_finetuned'] for x in rs):.4f}")
    return rows


#: The recipes --tune tries by default (fractions of the fit; ``every``: steps between selections, default
#: ``default_interval``).
TUNE_RECIPES = [{"ramp": r, "freeze": r} for r in (0.25, 0.5, 0.75)]


def _map(jobs, n):
    if n <= 1:
        return [_run(j) for j in jobs]
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(n) as pool:
        return pool.map(_run, jobs, chunksize=1)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["cnn", "resnet"])
    parser.add_argument("--targets", nargs="+", type=float, default=[0.5, 0.75])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--finetune", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="2 epochs, 1 fine-tune epoch, one seed, the CNN")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel (one torch thread each)")
    parser.add_argument("--tune", action="store_true", help="lightreg's ramp on a validation split instead (TUNE_RAMPS)")
    parser.add_argument("--recipes", nargs="+", default=None, help="--tune: recipes as JSON objects (TUNE_RECIPES)")
    parser.add_argument("--validation", action="store_true", help="the table on the validation split (for tuning)")
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    parser.add_argument("--merge", type=Path, default=None,
                        help="rows of an earlier run (JSON): kept where this run has no row of the same method, model, target, seed")
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.seeds, args.epochs, args.finetune, args.targets = ["cnn"], [0], 2, 1, [0.5]
    torch.set_num_threads(1)
    if args.tune:
        rows = tune(args)
    else:
        data = digits(validation=args.validation)
        jobs = [(m, name, t if m != "dense" else 0.0, data, args.epochs, args.finetune if m != "dense" else 0, seed)
                for name in args.models for seed in args.seeds for m in args.methods
                for t in (args.targets if m != "dense" else [0.0])]
        rows = _map(jobs, args.jobs)
        if args.merge:
            key = lambda r: (r["method"], r["model"], r["target"], r["seed"])  # noqa: E731
            new = {key(r) for r in rows}
            rows = [r for r in json.loads(args.merge.read_text()) if key(r) not in new and r["method"] in METHODS] + rows
        print(table(rows))
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
