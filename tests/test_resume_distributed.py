"""Stop at a checkpoint and resume under DDP and FSDP2 (2 CPU processes): the weights equal the uninterrupted run.

Two stacked Regularizers with schedules and Adam, as in ``test_regularizer_resume.py``, but the optimizer
state, the Regularizers' step counts and (under FSDP2) the sharded weights go through the strategy's
checkpointing. Float32: float64 resume drifts by about 2e-8 even in a plain Lightning run, without lightreg.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

from lightreg import L1, L2, CosineSchedule, LinearWarmup, Regularizer
from lightreg.base.distributed import global_value
from tests._spawn import run_on_ranks
from tests.models import ShardedNet, TinyNet, loader, regression_data, trainer

pytestmark = pytest.mark.slow


def _regularizers():
    return [
        Regularizer(L1(1.0), include="net.0.weight", schedule=LinearWarmup(5), name="first_l1"),
        Regularizer(L2(0.5), mode="decoupled", include="net.3.weight", schedule=CosineSchedule(8)),
    ]


def _strategy(kind):
    if kind == "ddp":
        return DDPStrategy(process_group_backend="gloo")
    return ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1, save_distributed_checkpoint=False)


def _run(kind, max_epochs, ckpt_dir=None, ckpt_path=None):
    x, y = regression_data(n=32, dtype=torch.float32)
    model = (TinyNet if kind == "ddp" else ShardedNet)(optimizer="adam", lr=0.02, dtype=torch.float32)
    regs = _regularizers()
    callbacks = [*regs]
    if ckpt_dir is not None:
        callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, save_last=True, save_top_k=0))
    trainer(callbacks=callbacks, max_epochs=max_epochs, enable_checkpointing=ckpt_dir is not None, devices=2,
            strategy=_strategy(kind)).fit(model, loader(x, y, batch_size=8), ckpt_path=ckpt_path)
    with torch.no_grad():
        weights = {n: global_value(p.detach()).clone() for n, p in model.named_parameters()}
    return weights, [r.steps_applied for r in regs]


def _resume_worker(rank: int, out: str) -> dict:
    result = {}
    for kind in ("ddp", "fsdp2"):
        ckpt_dir = Path(out) / kind
        full = _run(kind, max_epochs=4)
        _run(kind, max_epochs=2, ckpt_dir=ckpt_dir)
        resumed = _run(kind, max_epochs=4, ckpt_path=str(ckpt_dir / "last.ckpt"))
        result[kind] = {"full": full, "resumed": resumed}
    return result


@pytest.fixture(scope="module")
def resume_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("resume")
    return run_on_ranks(_resume_worker, out, str(out))


@pytest.mark.parametrize("kind", ["ddp", "fsdp2"])
def test_resume_is_exact(resume_runs, kind):
    for rank in resume_runs:
        (full, full_steps), (resumed, resumed_steps) = rank[kind]["full"], rank[kind]["resumed"]
        assert full.keys() == resumed.keys()
        for name in full:
            assert torch.equal(full[name], resumed[name]), name
        # 32 samples, 8 per rank and step: 2 steps an epoch, 4 epochs.
        assert full_steps == resumed_steps == [8, 8]
        assert (full["net.0.weight"] == 0).any()  # the L1 prox acted
