"""In mode ``gradient`` the penalty is part of what gradient clipping sees, exactly as if it were in the loss.

Lightning calls ``on_before_optimizer_step`` before it clips; the oracle is the same run with ``R(w)``
added to the loss. Float64, so the two must agree to rounding. (DDP + clipping: ``test_ddp.py``.)
"""

from __future__ import annotations

import pytest
import torch

from lightreg import L1, L2, ElasticNet, GroupLasso, Regularizer
from tests.models import TinyNet, loader, regression_data, trainer
from tests.oracles import explicit_value

PENALTIES = {"l1": L1(0.3), "l2": L2(2.0), "en": ElasticNet(0.5, 0.3), "gl": GroupLasso(0.3, dim=1)}


def fit(callbacks=(), clip=None, algorithm="norm", extra_loss=None):
    x, y = regression_data(n=16)
    model = TinyNet(lr=0.1, extra_loss=extra_loss)
    trainer(max_epochs=5, callbacks=list(callbacks), gradient_clip_val=clip, gradient_clip_algorithm=algorithm).fit(
        model, loader(x, y, batch_size=8))
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("algorithm,clip", [("norm", 0.05), ("value", 0.01)])
@pytest.mark.parametrize("key", list(PENALTIES))
def test_clipping_sees_the_penalty_as_in_the_loss(key, algorithm, clip):
    penalty = PENALTIES[key]
    ours = fit([Regularizer(penalty, mode="gradient")], clip=clip, algorithm=algorithm)
    oracle = fit(clip=clip, algorithm=algorithm, extra_loss=lambda m: sum(explicit_value(penalty, w) for w in (m.net[0].weight, m.net[3].weight)))
    for a, b in zip(ours, oracle, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)
    # Clipping was active: the same run without it ends elsewhere.
    unclipped = fit([Regularizer(penalty, mode="gradient")])
    assert max((a - b).abs().max().item() for a, b in zip(ours, unclipped, strict=True)) > 1e-4
