"""WeightMonitor on 2 CPU processes (gloo): DDP and FSDP2 log what one process logs; shards reduce exactly.

One spawn runs everything (start-up is paid once): a DDP fit, an FSDP2 fit (``ModelParallelStrategy`` with
``fully_shard``; ``net.3.weight`` (1, 16) is wholly on rank 0, so rank 1 holds an empty shard) and the raw
reduction on hand-built ``DTensor``s where each rank holds a different part of each tensor.
"""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

from lightreg import L1, Regularizer, sparsity_report
from lightreg.base.distributed import local_shards, shard_reduction
from lightreg.stats.histogram import histograms
from lightreg.stats.figures import COLUMNS, partial_sums
from tests._spawn import run_on_ranks
from tests.models import ShardedNet, TinyNet, loader, regression_data, trainer
from tests._readers import read_csv
from tests.test_monitor import CountingMonitor, weight_rows

pytestmark = pytest.mark.slow

N, STEPS, EXTRAS = 16, 4, ("near_zero", "linf", "structured")




def fit(save_dir: str, batch_size: int, model_cls=TinyNet, **trainer_kwargs) -> dict:
    """Train with an L1 prox and the monitor (every 2 steps, all extras); return what the CSV got."""
    x, y = regression_data(n=N)
    model = model_cls(lr=0.05)
    monitor = CountingMonitor(every_n_steps=2, extras=EXTRAS)
    logger = CSVLogger(save_dir, name="csv")
    tr = trainer(max_steps=STEPS, max_epochs=-1, logger=logger, callbacks=[Regularizer(L1(0.5)), monitor],
                 **trainer_kwargs)
    tr.fit(model, loader(x, y, batch_size=batch_size))
    out = {"computed": monitor.computed, "report": sparsity_report(model)}  # a collective under FSDP2
    if tr.is_global_zero:
        out["logged"] = weight_rows(read_csv(logger))
    return out


def hand_built(mesh):
    """Full tensors and their DTensors; Shard(0) of 5 rows puts rows 0-2 on rank 0 and 3-4 on rank 1."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    a = torch.arange(1.0, 21.0, dtype=torch.float64).reshape(5, 4)
    a[1] = 0  # a dead row
    a[:, 2] = 0  # a dead column
    a[:3, 0] = 0  # column 0 is zero on rank 0 only: not dead
    b = a.T.contiguous()  # Shard(1) splits its columns: row 0 is zero on rank 0's part only
    c = torch.tensor([[0.0, 3.0, -4.0]], dtype=torch.float64)  # one row: rank 1's shard is empty
    conv = torch.randn(3, 2, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    conv[:, 1] = 0
    conv[2, 0] = 0
    d = torch.tensor([[1e-9, 0.0], [2.0, -7.0]], dtype=torch.float64)  # replicated: counted once
    full = [a, b, c, conv, d, torch.tensor([0.0, -1.0, 2.0], dtype=torch.float64)]
    placements = [[Shard(0)], [Shard(1)], [Shard(0)], [Shard(0)], [Replicate()]]
    tensors = [distribute_tensor(t, mesh, p) for t, p in zip(full, placements, strict=False)] + [full[-1]]
    return full, tensors


def raw_reduction() -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial

    mesh = init_device_mesh("cpu", (2,))
    full, tensors = hand_built(mesh)
    kw = dict(near_zero=True, linf=True, structured=True)
    reduce = shard_reduction(tensors)
    out = {"full": full, "reduced": partial_sums(local_shards(tensors), reduce=reduce, **kw),
           "local": partial_sums([t.to_local() if isinstance(t, DTensor) else t for t in tensors], **kw),
           "local_numel": [t.to_local().numel() if isinstance(t, DTensor) else t.numel() for t in tensors]}
    out["hist"] = histograms(local_shards(tensors), bins=8, reduce=reduce)
    out["hist_local"] = histograms([t.to_local() if isinstance(t, DTensor) else t for t in tensors], bins=8)
    partial = DTensor.from_local(torch.ones(2, 2), mesh, [Partial()])
    try:
        shard_reduction([partial], ["p"])
    except ValueError as e:
        out["partial_error"] = str(e)
    return out


def _worker(rank: int, out_dir: str) -> dict:
    ddp = fit(f"{out_dir}/ddp", N, strategy=DDPStrategy(process_group_backend="gloo"), devices=2,
              use_distributed_sampler=False)  # every rank sees the whole batch: one process's step
    fsdp = fit(f"{out_dir}/fsdp", N // 2, model_cls=ShardedNet, devices=2,
               strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1,
                                              save_distributed_checkpoint=False))
    return {"ddp": ddp, "fsdp": fsdp, "raw": raw_reduction()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("monitor_dist")
    return run_on_ranks(_worker, out / "ranks", str(out))


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return fit(str(tmp_path_factory.mktemp("single")), N)


def assert_same_rows(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want) == [1, 3]
    for step in want:
        assert set(got[step]) == set(want[step])
        for key, value in want[step].items():
            assert got[step][key] == pytest.approx(value, rel=1e-12, abs=1e-14), (step, key)


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_two_processes_log_what_one_process_logs(runs, single, kind):
    rank0, rank1 = runs[0][kind], runs[1][kind]
    assert "logged" not in rank1  # only rank zero writes
    assert_same_rows(rank0["logged"], single["logged"])
    assert "weights/net.0.weight/dead_cols" in single["logged"][3]
    assert single["logged"][3]["weights/global/sparsity"] > 0
    # DDP: replicas are identical, so rank zero measures alone; FSDP2: every rank joins each reduction.
    assert (rank0["computed"], rank1["computed"]) == ((2, 0) if kind == "ddp" else (2, 2))
    for rank in (rank0, rank1):
        for got, want in zip(rank["report"], single["report"], strict=True):
            assert got["name"] == want["name"] and got["shape"] == want["shape"] and got["numel"] == want["numel"]
            assert [got[k] for k in ("l1", "l2", "sparsity", "dead_rows", "dead_cols")] == pytest.approx(
                [want[k] for k in ("l1", "l2", "sparsity", "dead_rows", "dead_cols")], rel=1e-12)


def test_sharded_partial_sums_reduce_to_the_whole_tensors(runs):
    full = runs[0]["raw"]["full"]
    want = partial_sums(full, near_zero=True, linf=True, structured=True)
    for rank in runs:
        assert torch.equal(rank["raw"]["reduced"], want)
    # each rank really held a different part, and its own figures were wrong
    assert runs[0]["raw"]["local_numel"][:3] == [12, 12, 3] and runs[1]["raw"]["local_numel"][:3] == [8, 8, 0]
    dead_cols, dead_rows = COLUMNS.index("dead_cols"), COLUMNS.index("dead_rows")
    assert runs[0]["raw"]["local"][0, dead_cols] == 2 and want[0, dead_cols] == 1
    assert runs[0]["raw"]["local"][1, dead_rows] == 2 and want[1, dead_rows] == 1
    assert want[3, dead_cols] == 1 and want[3, dead_rows] == 1
    zeros = COLUMNS.index("zeros")
    assert want[4, zeros] == 1 and runs[0]["raw"]["local"][4, zeros] + runs[1]["raw"]["local"][4, zeros] == 2


def test_sharded_histograms_are_those_of_the_whole_tensors(runs):
    want = histograms(runs[0]["raw"]["full"], bins=8)
    for rank in runs:
        assert rank["raw"]["hist"] == want
    # every element counted once, replicas and the plain (replicated) tensor included
    assert [sum(counts) for counts, _ in want] == [t.numel() for t in runs[0]["raw"]["full"]]
    assert runs[0]["raw"]["hist_local"][0] != want[0]  # a shard's own histogram differs


def test_partial_placement_is_refused(runs):
    for rank in runs:
        assert "p: a DTensor with a Partial placement" in rank["raw"]["partial_error"]
