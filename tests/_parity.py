"""One table of (penalty, mode) runs, trained either on one process or on several (DDP, FSDP2).

A parity test trains every entry once on N ranks (each rank sees 1/N of the global batch) and once on
one process with the whole batch, and compares the final weights: float64, full-batch steps, so the
only difference is the order of floating-point sums (~1e-16 relative).
"""

from __future__ import annotations

import csv
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger

from lightreg import L0, L1, L2, ElasticNet, GroupLasso, Regularizer
from lightreg.base.distributed import global_value, local_tensor
from lightreg.model.selection import clean_name
from tests.models import TinyNet, loader, regression_data, trainer

N, D = 16, 8
EPOCHS = 4
PENALTIES = {
    "l1": lambda: L1(0.5),
    "l2": lambda: L2(0.5),
    "en": lambda: ElasticNet(0.4, l1_ratio=0.5),
    "gl0": lambda: GroupLasso(0.2, dim=0),  # rows: whole groups on one rank under FSDP2
    "gl1": lambda: GroupLasso(0.2, dim=1),  # columns: every group split across the ranks under FSDP2
    "l0": lambda: L0(0.01),
}
OPTIMIZER = {"gradient": "sgd", "decoupled": "adam", "proximal": "sgd"}
#: Adam's per-coordinate prox and target sparsity: name -> (table key, optimizer, Regularizer keywords).
ADAPTIVE = {
    "adam-l1": ("l1-proximal", "adam", {}),
    "adam-gl0": ("gl0-proximal", "adam", {}),
    "adam-gl1": ("gl1-proximal", "adam", {}),
    "target-l0": ("l0-proximal", "adam", {"target_sparsity": 0.6}),
    "target-l1-sgd": ("l1-proximal", "sgd", {"target_sparsity": 0.6}),
    "target-gl1": ("gl1-proximal", "adam", {"target_sparsity": 0.5}),
    "target-gl0": ("gl0-proximal", "adam", {"target_sparsity": 0.5}),
    # selections at steps 0 and 2 (the step before the freeze), the zeros of step 0 held at step 1
    "target-l1-held": ("l1-proximal", "adam", {"target_sparsity": 0.6, "target_every": 2}),
}


class TwoGroupNet(TinyNet):
    """TinyNet with one param group per Linear, at different learning rates (the penalty must use each)."""

    def configure_optimizers(self):
        cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}[self.optimizer]
        rest = [p for n, p in self.named_parameters() if not n.startswith("net.0.")]
        return cls([{"params": list(self.net[0].parameters()), "lr": 0.02}, {"params": rest, "lr": 0.1}])


def table(penalties: list[str]) -> list[str]:
    return [f"{p}-{m}" for p in penalties for m in ("gradient", "decoupled", "proximal")]


class Snapshot(Callback):
    """Records the whole weights (a collective under FSDP2) and the Regularizers' metrics at the end of fit."""

    def __init__(self, regs):
        self.regs, self.out = regs, {}

    def on_train_end(self, trainer, pl_module):
        with torch.no_grad():
            named = list(pl_module.named_parameters())
            self.out["weights"] = {clean_name(n): global_value(p.detach()).clone() for n, p in named}
            self.out["local_numel"] = {clean_name(n): local_tensor(p).numel() for n, p in pl_module.named_parameters()}
        self.out["metrics"] = {k: float(v) for r in self.regs for k, v in r.metrics().items()}
        self.out["names"] = [n for r in self.regs for n, _ in r.penalised()]
        self.out["steps_applied"] = [r.steps_applied for r in self.regs]


def train(key: str, *, batch_size: int, model_cls=TinyNet, accumulate: int = 1, clip: float | None = None,
          extra_callbacks=(), log_dir: Path | None = None, dtype=torch.float64, include=None, **trainer_kwargs) -> dict:
    """Train the table entry ``key`` (``"<penalty>-<mode>"``, ``"none"``, or a name of ``ADAPTIVE``) and return
    its :class:`Snapshot`.

    With ``log_dir``, a ``CSVLogger`` logs every step and ``out["logged"]`` holds the ``reg/`` rows it wrote.
    """
    if log_dir is not None:
        trainer_kwargs.update(logger=CSVLogger(log_dir, name=key, version=0), log_every_n_steps=1)
    x, y = regression_data(n=N, d=D, dtype=dtype)
    regs, reg_kwargs = [], {}
    if key in ADAPTIVE:
        key, optimizer, reg_kwargs = ADAPTIVE[key]
    else:
        optimizer = OPTIMIZER[key.split("-")[1]] if key != "none" else "sgd"
    if key != "none":
        penalty, mode = key.split("-")
        regs = [Regularizer(PENALTIES[penalty](), mode=mode, include=include, **reg_kwargs)]
    model = model_cls(d=D, optimizer=optimizer, lr=0.05, dtype=dtype)
    snap = Snapshot(regs)
    trainer(max_epochs=EPOCHS, callbacks=[*regs, snap, *extra_callbacks], accumulate_grad_batches=accumulate,
            gradient_clip_val=clip, **trainer_kwargs).fit(model, loader(x, y, batch_size=batch_size))
    if log_dir is not None and model.global_rank == 0:
        with open(Path(log_dir) / key / "version_0" / "metrics.csv") as f:
            snap.out["logged"] = [{k: float(v) for k, v in row.items() if k.startswith("reg/") and v}
                                  for row in csv.DictReader(f)]
        snap.out["logged"] = [row for row in snap.out["logged"] if row]
    return snap.out


class OneProcess:
    """The single-process oracles of a test module, each trained once on the whole batch and then shared.

    ``oracle(key, **kwargs)`` is ``train(key, batch_size=N, **kwargs)``, computed on first use (a parity test
    compares every distributed case with it, and several cases share one oracle). The results are read only.
    """

    def __init__(self) -> None:
        self._runs: dict[tuple, dict] = {}

    def __call__(self, key: str, **kwargs) -> dict:
        kwargs = {k: v for k, v in kwargs.items() if v is not None}  # None is train()'s default for each
        cache_key = (key, tuple(sorted(kwargs.items(), key=lambda item: item[0])))
        if cache_key not in self._runs:
            self._runs[cache_key] = train(key, batch_size=N, **kwargs)
        return self._runs[cache_key]


def assert_same(a: dict, b: dict, tol: float = 1e-12) -> None:
    assert a.keys() == b.keys()
    for name in a:
        err = (a[name] - b[name]).abs().max().item()
        assert err <= tol * max(1.0, b[name].abs().max().item()), f"{name}: max diff {err:.3g}"
