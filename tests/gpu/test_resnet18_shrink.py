"""torchvision's resnet18 on CUDA: coupled group lasso, then shrink with the same outputs.

torchvision's wheels need CUDA torch, so this runs only where CUDA is (``scripts/gpu_check.sh``); on the CPU
build torchvision fails to import and the test is skipped.
"""

from __future__ import annotations

import pytest
import torch

from lightreg import CoupledGroupLasso, shrink
from lightreg.proximal.metric import LazySteps, step_rule

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _resnet18():
    try:
        from torchvision.models import resnet18
    except Exception as e:  # ImportError, or torchvision's compiled ops not loading against this torch
        pytest.skip(f"torchvision does not import: {e}")
    return resnet18(num_classes=10)


def test_resnet18_coupled_groups_shrink_exactly():
    torch.backends.cudnn.allow_tf32 = False  # float32 rounding only: the comparison below is relative 1e-5
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    model = _resnet18().cuda()
    x = torch.randn(8, 3, 32, 32, device="cuda")
    y = torch.arange(8, device="cuda") % 10
    penalty = CoupledGroupLasso(0.02)
    roots = [(n, p) for n, p in model.named_parameters() if p.ndim >= 2]
    params = [p for _, p in penalty.bind(model, roots, example_inputs=x)]
    assert any(len({s.name for s in f.slices}) > 6 for f in penalty.groups.families)  # residual stages: many tensors
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(10):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        with torch.no_grad():
            penalty.apply_prox_(params, LazySteps(step_rule(opt, opt.param_groups[0]), params))
    alive = sum(int(f.alive().sum()) for f in penalty.groups.families)
    assert 0 < alive < sum(f.units for f in penalty.groups.families)
    model.eval()
    small = shrink(model, x)
    fresh = torch.randn(4, 3, 32, 32, device="cuda")
    with torch.no_grad():
        expected, got = model(fresh), small(fresh)
    assert float((got - expected).abs().max()) <= 1e-5 * float(expected.abs().max())
    assert small.shrink_report.params_after < small.shrink_report.params_before
