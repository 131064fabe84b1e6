"""Names the user wrote survive wrappers: ``torch.compile`` (``_orig_mod.``) and FSDP1 (``_fsdp_wrapped_module.``).

``backend="eager"`` keeps compilation cheap on CPU; the wrapper (and so the names) is the same as with inductor.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from lightreg import L1, Regularizer, WeightMonitor, select_parameters
from tests.models import TinyNet, loader, regression_data, trainer

NAMES = ["net.0.weight", "net.3.weight"]


class CompiledNet(TinyNet):
    """TinyNet whose ``net`` is compiled: its parameters are named ``net._orig_mod.*``."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.net = torch.compile(self.net, backend="eager")


def _fit(model, *callbacks):
    x, y = regression_data(n=16)
    trainer(max_epochs=3, callbacks=list(callbacks)).fit(model, loader(x, y, batch_size=8))
    return [p.detach().clone() for p in model.parameters()]


def test_compiled_submodule_names_and_training():
    model = CompiledNet()
    assert any("_orig_mod" in n for n, _ in model.named_parameters())
    reg = Regularizer(L1(0.5), include=["net.0.*", "net.3.weight"], exclude="net.0.bias")
    monitor = WeightMonitor(every_n_steps=1)
    compiled = _fit(model, reg, monitor)
    assert [n for n, _ in reg.penalised()] == NAMES
    assert {k for k in monitor.metrics() if k.endswith("/l1")} == {f"weights/{n}/l1" for n in NAMES}
    plain_reg = Regularizer(L1(0.5), include=["net.0.*", "net.3.weight"], exclude="net.0.bias")
    plain = _fit(TinyNet(), plain_reg)
    for a, b in zip(compiled, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    ours, theirs = ({k: float(v) for k, v in r.metrics().items()} for r in (reg, plain_reg))
    assert ours == pytest.approx(theirs, rel=1e-12)


def test_compiled_lightning_module_names():
    model = TinyNet()
    reg = Regularizer(L1(0.5), include=NAMES)
    _fit(torch.compile(model, backend="eager"), reg)
    assert [n for n, _ in reg.penalised()] == NAMES
    assert (model.net[0].weight == 0).any()  # the penalty reached the module that trained


def test_fsdp1_wrapped_names_resolve():
    """FSDP1 itself is refused by the callbacks, but selection reads its names as the user wrote them."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = TinyNet()
        model.net = FullyShardedDataParallel(model.net, use_orig_params=True, device_id=torch.device("cpu"))
        assert all("_fsdp_wrapped_module" in n for n, _ in model.named_parameters())
        assert [n for n, _ in select_parameters(model)] == NAMES
        assert [n for n, _ in select_parameters(model, include="net.1.*")] == ["net.1.weight", "net.1.bias"]
    finally:
        dist.destroy_process_group()
