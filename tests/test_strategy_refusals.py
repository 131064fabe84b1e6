"""Layouts the penalties cannot act on correctly are refused at fit start, before any weight changes.

FSDP1 (``FSDPStrategy``) keeps flat 1-D shards; DeepSpeed keeps its own partitioned copies of weights
and gradients. The strategy objects are Lightning's own; FSDP1 also runs for real here (one process,
gloo, CPU) so the refusal is seen from a model that was wrapped by hand.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import (
    DDPStrategy,
    DeepSpeedStrategy,
    FSDPStrategy,
    ModelParallelStrategy,
)

from lightreg import L1, Regularizer, WeightMonitor
from lightreg.callbacks.strategies import check_model, check_strategy
from tests.models import TinyNet, loader, regression_data, trainer


def _deepspeed(stage: int) -> DeepSpeedStrategy:
    # Lightning's constructor needs the deepspeed package; the refusal only looks at the object's type and config.
    strategy = DeepSpeedStrategy.__new__(DeepSpeedStrategy)
    strategy.config = {"zero_optimization": {"stage": stage}}
    return strategy


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_every_stage_refused(stage):
    match = rf"DeepSpeedStrategy \(ZeRO stage {stage}\).*p.grad is None.*ModelParallelStrategy"
    with pytest.raises(ValueError, match=match):
        check_strategy(_deepspeed(stage), "Regularizer 'l1'")


def test_fsdp1_strategy_refused():
    with pytest.raises(ValueError, match=r"Regularizer 'l1' does not support FSDPStrategy \(FSDP1\).*fully_shard"):
        check_strategy(FSDPStrategy(), "Regularizer 'l1'")


@pytest.mark.parametrize(
    "strategy", [DDPStrategy(), ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)])
def test_supported_strategies_pass(strategy):
    check_strategy(strategy, "Regularizer 'l1'")


def test_regularizer_refuses_deepspeed_before_any_change():
    reg = Regularizer(L1(0.1))
    model = TinyNet()
    before = [p.detach().clone() for p in model.parameters()]

    class FakeTrainer:  # on_fit_start reads the strategy first; nothing else of the trainer is reached
        strategy = _deepspeed(2)

    with pytest.raises(ValueError, match="DeepSpeedStrategy"):
        reg.on_fit_start(FakeTrainer(), model)
    assert reg.penalised() == [] and reg.hooked == []
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


@pytest.fixture
def gloo_world_of_one():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


class HandWrapped(TinyNet):
    def __init__(self, use_orig_params: bool):
        super().__init__()
        from torch.distributed.fsdp import FullyShardedDataParallel

        self.net = FullyShardedDataParallel(self.net, use_orig_params=use_orig_params, device_id=torch.device("cpu"))


@pytest.mark.parametrize("use_orig_params", [False, True])
def test_hand_wrapped_fsdp1_refused_at_fit_start(gloo_world_of_one, use_orig_params):
    model = HandWrapped(use_orig_params)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = regression_data(n=8)
    with pytest.raises(ValueError, match=r"Regularizer 'l1': .*FSDP1.*Use strategy='ddp'"):
        trainer(max_steps=1, callbacks=[Regularizer(L1(0.1))]).fit(model, loader(x, y))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_check_model_refuses_flat_and_deepspeed_parameters():
    model = torch.nn.Linear(2, 2)
    model.weight._is_flat_param = True  # how FSDP1 marks its FlatParameter
    with pytest.raises(ValueError, match=r"'weight' is an FSDP1 FlatParameter"):
        check_model(model, "WeightMonitor")
    model = torch.nn.Linear(2, 2)
    model.bias.ds_id = 0  # DeepSpeed's ZeRO parameters carry ds_id / ds_status
    with pytest.raises(ValueError, match=r"'bias' is a DeepSpeed ZeRO parameter"):
        check_model(model, "WeightMonitor")


def test_freeze_zeros_refuses_deepspeed_before_any_change():
    from lightreg import FreezeZeros

    model = TinyNet()
    before = [p.detach().clone() for p in model.parameters()]
    freeze = FreezeZeros()
    with pytest.raises(ValueError, match=r"FreezeZeros 'freeze_zeros' does not support DeepSpeedStrategy \(ZeRO stage 2\)"):
        freeze.on_fit_start(type("FakeTrainer", (), {"strategy": _deepspeed(2)})(), model)
    assert freeze.masks == {} and freeze.hooked == []
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_monitor_refuses_flat_shards_and_accepts_what_it_can_read():
    """One rule for both callbacks: the monitor only reads weights, so ZeRO stages 1-2 (whole weights) pass."""
    from lightreg.callbacks.strategies import check_fit

    model = TinyNet()
    for strategy, match in [(FSDPStrategy(), r"WeightMonitor does not support FSDPStrategy \(FSDP1\)"),
                            (_deepspeed(3), r"WeightMonitor does not support DeepSpeedStrategy \(ZeRO stage 3\)")]:
        with pytest.raises(ValueError, match=match):
            WeightMonitor().on_fit_start(type("FakeTrainer", (), {"strategy": strategy})(), model)
    for stage in (1, 2):
        check_fit(_deepspeed(stage), model, "WeightMonitor", read_only=True)
        with pytest.raises(ValueError, match=rf"Regularizer 'l1' does not support DeepSpeedStrategy \(ZeRO stage {stage}\)"):
            check_fit(_deepspeed(stage), model, "Regularizer 'l1'")
