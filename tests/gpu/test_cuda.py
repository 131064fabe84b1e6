"""Checks that need CUDA: the fused ``torch._foreach_*`` fast path, FSDP2 on one GPU, FSDP1 refused.

Skipped cleanly without a GPU; ``scripts/gpu_check.sh`` runs them (with the CUDA cases of
``tests/test_precision.py``: ``16-mixed`` with the real CUDA grad scaler) and the benchmark.
"""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

from lightreg import L1, L2, ElasticNet, GroupLasso, Regularizer
from lightreg.penalties.elastic_net import use_foreach
from tests._parity import N, assert_same, train
from tests.models import TinyNet, loader, regression_data, trainer

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

SHAPES = [(64, 32), (7,), (128, 3, 3), (1, 1), (300,)]  # uneven sizes: several foreach chunks


def _tensors(device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64).to(device) for s in SHAPES]


def _explicit(op, key, ws, gs, s):
    """The penalties' formulas written out, on CPU (independent of the kernels under test)."""
    out = []
    for w, g in zip(ws, gs, strict=True):
        if key == "l1":
            out.append({"grad": g + s * w.sign(), "decay": w - s * w.sign(),
                        "prox": w.sign() * (w.abs() - s).clamp(min=0)}[op])
        else:  # l2
            out.append({"grad": g + s * w, "decay": w * (1 - s), "prox": w / (1 + s)}[op])
    return out


@pytest.mark.parametrize("op", ["grad", "decay", "prox"])
@pytest.mark.parametrize("key", ["l1", "l2"])
def test_foreach_fast_path_matches_formula_and_cpu_loop(key, op):
    penalty = {"l1": L1(0.3), "l2": L2(0.3)}[key]
    lr = 0.5
    s = 0.3 if op == "grad" else lr * 0.3
    cuda, cpu = _tensors("cuda"), _tensors("cpu")
    assert use_foreach(cuda) and not use_foreach(cpu)
    gcuda, gcpu = _tensors("cuda", seed=1), _tensors("cpu", seed=1)
    expected = _explicit(op, key, cpu, gcpu, s)
    for ws, gs in ((cuda, gcuda), (cpu, gcpu)):
        if op == "grad":
            penalty.apply_gradient_(gs, ws)
        else:
            getattr(penalty, f"apply_{op}_")(ws, lr)
    got_cuda = gcuda if op == "grad" else cuda
    got_cpu = gcpu if op == "grad" else cpu
    for a, b, e in zip(got_cuda, got_cpu, expected, strict=True):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-14, atol=1e-15)
        torch.testing.assert_close(b, e, rtol=1e-14, atol=1e-15)


def test_elastic_net_and_group_lasso_on_cuda_match_cpu():
    for penalty in (ElasticNet(0.3, 0.4), GroupLasso(0.3, dim=1)):
        cuda, cpu = _tensors("cuda")[:1], _tensors("cpu")[:1]
        penalty.apply_prox_(cuda, 0.5)
        penalty.apply_prox_(cpu, 0.5)
        torch.testing.assert_close(cuda[0].cpu(), cpu[0], rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("key", ["l1-proximal", "en-decoupled", "gl1-gradient", "gl0-proximal"])
def test_fsdp2_on_one_gpu_equals_plain(key):
    from tests.test_fsdp import ShardedNet

    strategy = ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1, save_distributed_checkpoint=False)
    sharded = train(key, batch_size=N, model_cls=ShardedNet, accelerator="gpu", devices=1, strategy=strategy)
    plain = train(key, batch_size=N, accelerator="gpu", devices=1)
    assert_same(sharded["weights"], plain["weights"])
    assert sharded["names"] == plain["names"] == ["net.0.weight", "net.3.weight"]
    assert sharded["metrics"] == pytest.approx(plain["metrics"], rel=1e-12)


def test_fsdp1_strategy_refused_on_gpu():
    x, y = regression_data(n=8, dtype=torch.float32)
    model = TinyNet(dtype=torch.float32)
    with pytest.raises(ValueError, match=r"FSDPStrategy \(FSDP1\).*fully_shard"):
        trainer(accelerator="gpu", devices=1, strategy=FSDPStrategy(), max_steps=1,
                callbacks=[Regularizer(L1(0.1))]).fit(model, loader(x, y))


@pytest.mark.parametrize("strategy", ["deepspeed_stage_2", "deepspeed_stage_3"])
def test_deepspeed_refused_on_gpu(strategy):
    pytest.importorskip("deepspeed")
    x, y = regression_data(n=8, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"DeepSpeedStrategy \(ZeRO stage [23]\)"):
        trainer(accelerator="gpu", devices=1, strategy=strategy, max_steps=1,
                callbacks=[Regularizer(L1(0.1))]).fit(TinyNet(dtype=torch.float32), loader(x, y))


@pytest.mark.parametrize("kwargs", [{"capturable": True}, {"fused": True}, {"foreach": True}],
                         ids=["capturable", "fused", "foreach"])
@pytest.mark.parametrize("cls", [torch.optim.Adam, torch.optim.AdamW, torch.optim.Adagrad, torch.optim.RAdam, torch.optim.NAdam])
def test_per_coordinate_step_with_the_step_count_on_the_gpu(cls, kwargs):
    """capturable/fused keep `step` on the GPU: the rule computes the bias correction there, and equals the CPU rule."""
    from lightreg.proximal.metric import step_rule

    if "fused" in kwargs and cls in (torch.optim.RAdam, torch.optim.NAdam):
        pytest.skip(f"{cls.__name__} has no fused implementation")
    if "capturable" in kwargs and cls is torch.optim.Adagrad:
        pytest.skip("Adagrad has no capturable flag")
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(64, 32, generator=g) for _ in range(7)]
    steps = []
    for device, extra in (("cpu", {}), ("cuda", kwargs)):
        p = torch.nn.Parameter(torch.ones(64, 32, device=device))
        opt = cls([p], lr=0.01, **extra)
        for grad in grads:
            p.grad = grad.to(device)
            opt.step()
        steps.append(torch.as_tensor(step_rule(opt, opt.param_groups[0])(p)).expand_as(p).cpu())
    torch.testing.assert_close(steps[1], steps[0], rtol=1e-5, atol=0)
