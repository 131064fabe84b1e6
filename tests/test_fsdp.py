"""FSDP2 on CPU (and tensor parallel): ``ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)``,
``fully_shard``, gloo.

Parameters are ``DTensor``s sharded by rows; ``net.3.weight`` (1, 16) lives wholly on rank 0, so rank 1
holds an empty shard. Every penalty in every mode must equal one process on the global batch; GroupLasso
with ``dim=1`` has every group split across the ranks, so its norms need the cross-rank reduction. The
penalty value the Regularizer reports must be the global one on every rank, and names must be the
user's. FSDP1 (``FSDPStrategy``) and DeepSpeed are refused: see ``test_strategy_refusals.py``.
"""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

from lightreg import L1, GroupLasso, Regularizer
from lightreg.base.distributed import is_dtensor
from tests._parity import ADAPTIVE, N, OneProcess, TwoGroupNet, assert_same, table, train
from tests._spawn import run_on_ranks
from tests.models import ShardedNet, TinyNet, loader, regression_data, trainer

pytestmark = pytest.mark.slow

KEYS = table(["l1", "l2", "en", "gl0", "gl1"])
GROUP_KEYS = ["l1-proximal", "en-decoupled"]
LOGGED = "gl1-proximal"
BF16 = "en-gradient"
# Tensor parallel: elementwise penalties act on each local shard whatever its placement (the FSDP2 cases cover
# that), so one of them suffices; GroupLasso's norms depend on the placement, in every mode.
TP_KEYS = ["en-proximal", *table(["gl0", "gl1"])]
ALL_PARAM_KEYS = ["gl0-proximal", "en-gradient"]


class TensorParallelNet(TinyNet):
    """Tensor parallel on 2 ranks: ``net.0.weight`` split by rows (Shard(0)), ``net.3.weight`` by columns (Shard(1))."""

    def configure_model(self):
        from torch.distributed.tensor import Replicate
        from torch.distributed.tensor.parallel import (
            ColwiseParallel,
            RowwiseParallel,
            parallelize_module,
        )

        parallelize_module(self.net, self.device_mesh["tensor_parallel"], {
            "0": ColwiseParallel(output_layouts=Replicate()), "3": RowwiseParallel(input_layouts=Replicate())})


class ShardedTwoGroupNet(ShardedNet, TwoGroupNet):
    """Sharded, with one optimizer param group per Linear at different learning rates."""


class RecordingL1(L1):
    """L1 that records the types of the tensors its in-place steps receive."""

    seen: set = set()

    def apply_prox_(self, params, steps, alpha=None):
        self.seen.update(type(p).__name__ for p in params)
        return super().apply_prox_(params, steps, alpha)


class RecordingGroupLasso(GroupLasso):
    seen: set = set()

    def apply_prox_(self, params, steps, alpha=None):
        self.seen.update(type(p).__name__ for p in params)
        return super().apply_prox_(params, steps, alpha)


def _fsdp(**kw):
    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1, save_distributed_checkpoint=False)
    return dict(strategy=strategy, devices=2, **kw)


def _fsdp_worker(rank: int, log_dir) -> dict:
    out = {key: train(key, batch_size=N // 2, model_cls=ShardedNet, **_fsdp()) for key in KEYS}
    out["accumulate"] = train("en-proximal", batch_size=N // 4, accumulate=2, model_cls=ShardedNet, **_fsdp())
    # Adam's per-coordinate prox (GroupLasso's metric prox sums split groups across ranks) and target sparsity
    # (histograms of the levels summed across the shards).
    for name in ADAPTIVE:
        out[name] = train(name, batch_size=N // 2, model_cls=ShardedNet, **_fsdp())
    # Norm clipping of DTensor gradients sees the penalty (mode gradient), as with the penalty in the loss.
    out["clip"] = train("gl1-gradient", batch_size=N // 2, clip=0.05, model_cls=ShardedNet, **_fsdp())
    for key in GROUP_KEYS:
        out[f"groups-{key}"] = train(key, batch_size=N // 2, model_cls=ShardedTwoGroupNet, **_fsdp())
    # bf16 autocast on the shards' float32 weights (ModelParallelStrategy's supported mixed precision).
    out["bf16"] = train(BF16, batch_size=N // 2, model_cls=ShardedNet, dtype=torch.float32, precision="bf16-mixed",
                        **_fsdp())
    # Its oracle: DDP, whose ranks compute the same bf16-rounded half-batch gradients (float64 DDP = one process).
    out["bf16-ddp"] = train(BF16, batch_size=N // 2, dtype=torch.float32, precision="bf16-mixed", devices=2,
                            strategy=DDPStrategy(process_group_backend="gloo"))
    # Every parameter, 1-D ones too (net.3.bias: rank 1's shard is empty).
    for key in ALL_PARAM_KEYS:
        out[f"all-{key}"] = train(key, batch_size=N // 2, model_cls=ShardedNet, include="*", **_fsdp())
    # Tensor parallel: every rank sees the whole batch; groups of dim 0 are split in net.3.weight (Shard(1)).
    for key in TP_KEYS:
        tp = ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=2, save_distributed_checkpoint=False)
        out[f"tp-{key}"] = train(key, batch_size=N, model_cls=TensorParallelNet, strategy=tp, devices=2)
    # Logged through a real logger: every rank takes part in the penalty's reduction on log steps.
    out["logged"] = train(LOGGED, batch_size=N // 2, model_cls=ShardedNet, log_dir=log_dir, **_fsdp())
    # Names, binding and the parameters' type as the Regularizer sees them at fit start.
    x, y = regression_data(n=N)
    reg = Regularizer(L1(0.1), include=["net.0.*", "net.3.weight"], exclude="net.0.bias")
    model = ShardedNet(lr=0.05)
    trainer(max_steps=1, callbacks=[reg], **_fsdp()).fit(model, loader(x, y, batch_size=N // 2))
    out["names"] = [n for n, _ in reg.penalised()]
    # Separable penalties get the local shards (plain tensors); GroupLasso, whose groups span shards, the DTensor.
    regs = [Regularizer(RecordingL1(0.1), include="net.0.weight"),
            Regularizer(RecordingGroupLasso(0.1), include="net.3.weight")]
    trainer(max_steps=1, callbacks=regs, **_fsdp()).fit(ShardedNet(lr=0.05), loader(x, y, batch_size=N // 2))
    out["operand_types"] = (sorted(RecordingL1.seen), sorted(RecordingGroupLasso.seen))
    out["dtensor"] = [is_dtensor(p) for _, p in reg.penalised()]
    (optimizer,) = model.trainer.optimizers
    held = [q for group in optimizer.param_groups for q in group["params"]]
    out["bound_to_optimizer"] = all(any(p is q for q in held) for _, p in reg.penalised())
    return out


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    return run_on_ranks(_fsdp_worker, out, out / "logs")


@pytest.fixture(scope="module")
def oracle():
    return OneProcess()


@pytest.mark.parametrize("key", [*KEYS, "accumulate"])
def test_fsdp2_equals_one_process(fsdp_runs, oracle, key):
    """Weights, and R(w) reported on every rank (gl1: GroupLasso over groups split across the ranks), as one process."""
    rank0, rank1 = fsdp_runs[0][key], fsdp_runs[1][key]
    # Really sharded: rank 1 holds nothing of net.3.weight, and the two ranks split net.0.weight.
    assert rank1["local_numel"]["net.3.weight"] == 0 and rank0["local_numel"]["net.3.weight"] == 16
    assert rank0["local_numel"]["net.0.weight"] + rank1["local_numel"]["net.0.weight"] == 16 * 8
    assert_same(rank0["weights"], rank1["weights"], tol=0.0)
    single = oracle(key if key != "accumulate" else "en-proximal")
    assert_same(rank0["weights"], single["weights"])
    assert rank0["names"] == single["names"] == ["net.0.weight", "net.3.weight"]
    # R(w) reported on each rank is the global value, not the shard's.
    for rank in (rank0, rank1):
        assert rank["metrics"] == pytest.approx(single["metrics"], rel=1e-12)
        assert rank["steps_applied"] == single["steps_applied"]


@pytest.mark.parametrize("key", list(ADAPTIVE))
def test_fsdp2_adaptive_prox_and_target_sparsity_equal_one_process(fsdp_runs, oracle, key):
    rank0, rank1 = fsdp_runs[0][key], fsdp_runs[1][key]
    assert_same(rank0["weights"], rank1["weights"], tol=0.0)
    single = oracle(key)
    assert_same(rank0["weights"], single["weights"])
    for name in single["names"]:
        assert torch.equal(rank0["weights"][name] == 0, single["weights"][name] == 0), name
    # The level, the measured sparsity and the penalty are global on every rank (not a shard's).
    for rank in (rank0, rank1):
        assert rank["metrics"] == pytest.approx(single["metrics"], rel=1e-12)


def test_fsdp2_names_and_binding(fsdp_runs):
    for rank in fsdp_runs:
        assert rank["names"] == ["net.0.weight", "net.3.weight"]
        assert rank["dtensor"] == [True, True]
        assert rank["bound_to_optimizer"]
        assert rank["operand_types"] == (["Tensor"], ["DTensor"])


@pytest.mark.parametrize("key", GROUP_KEYS)
def test_fsdp2_param_groups_use_their_own_lr(fsdp_runs, oracle, key):
    single = oracle(key, model_cls=TwoGroupNet)
    plain_lr = oracle(key)  # one group: the two-group run must differ from it
    for rank in fsdp_runs:
        assert_same(rank[f"groups-{key}"]["weights"], single["weights"])
    assert (single["weights"]["net.0.weight"] - plain_lr["weights"]["net.0.weight"]).abs().max() > 1e-4


def test_fsdp2_logged_penalty_is_global(fsdp_runs, tmp_path):
    single = train(LOGGED, batch_size=N, log_dir=tmp_path)
    logged = fsdp_runs[0]["logged"]["logged"]
    assert len(logged) == len(single["logged"]) >= 4
    for row, expected in zip(logged, single["logged"], strict=True):
        assert row.keys() == expected.keys() == {"reg/group_lasso/penalty", "reg/group_lasso/alpha"}
        assert row == pytest.approx(expected, rel=1e-12)


def test_fsdp2_bf16_mixed(fsdp_runs, oracle):
    # bf16 rounds each rank's half-batch gradient, so one process on the whole batch differs by ~1e-3;
    # DDP computes exactly those half-batch gradients and averages them as FSDP2's reduce-scatter does.
    for rank in fsdp_runs:
        assert_same(rank["bf16"]["weights"], rank["bf16-ddp"]["weights"], tol=1e-6)
        assert rank["bf16"]["metrics"] == pytest.approx(rank["bf16-ddp"]["metrics"], rel=1e-6)
    fp32 = oracle(BF16, dtype=torch.float32)
    bf16 = fsdp_runs[0]["bf16"]["weights"]
    assert max((bf16[n] - fp32["weights"][n]).abs().max().item() for n in fp32["names"]) > 1e-5


@pytest.mark.parametrize("key", TP_KEYS)
def test_tensor_parallel_equals_one_process(fsdp_runs, oracle, key):
    """The DTensor handling is placement-generic: column shards (Shard(1)) as well as FSDP2's row shards."""
    single = oracle(key)
    for rank in fsdp_runs:
        run = rank[f"tp-{key}"]
        assert run["local_numel"]["net.3.weight"] == 8 and run["local_numel"]["net.0.weight"] == 64
        assert_same(run["weights"], single["weights"])
        assert run["metrics"] == pytest.approx(single["metrics"], rel=1e-12)


@pytest.mark.parametrize("key", ALL_PARAM_KEYS)
def test_fsdp2_one_dimensional_and_empty_shards(fsdp_runs, oracle, key):
    single = oracle(key, include="*")
    assert len(single["names"]) == 6
    assert fsdp_runs[1][f"all-{key}"]["local_numel"]["net.3.bias"] == 0
    for rank in fsdp_runs:
        assert_same(rank[f"all-{key}"]["weights"], single["weights"])
        assert rank[f"all-{key}"]["metrics"] == pytest.approx(single["metrics"], rel=1e-12)


def test_fsdp2_clipping_sees_the_penalty(fsdp_runs, oracle):
    single = oracle("gl1-gradient", clip=0.05)
    unclipped = oracle("gl1-gradient")
    for rank in fsdp_runs:
        assert_same(rank["clip"]["weights"], single["weights"])
    assert (single["weights"]["net.0.weight"] - unclipped["weights"]["net.0.weight"]).abs().max() > 1e-4
