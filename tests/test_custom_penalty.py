"""A user-defined penalty written against the public contract (value, gradient, prox), in all three modes.

The penalty pulls weights towards a constant ``c``: ``R(w) = (alpha/2) * sum (w - c)²``. It implements only
the three pure functions; the in-place forms the callback calls are the base class's defaults. Each mode is
checked against a hand-written training loop with plain SGD on the same batches.
"""

import pytest
import torch
from torch import nn

from lightreg import Penalty, Regularizer
from tests.models import TinyNet, loader, regression_data, trainer


class PullTo(Penalty):
    name = "pull"

    def __init__(self, alpha, c):
        super().__init__(alpha)
        self.c = c

    def value(self, w, alpha):
        return 0.5 * alpha * ((w - self.c) ** 2).sum()

    def gradient(self, w, alpha):
        return alpha * (w - self.c)

    def prox(self, w, step, alpha):
        return (w + step * alpha * self.c) / (1 + step * alpha)


ALPHA, C, LR, EPOCHS, BATCH = 0.4, 0.25, 0.05, 2, 16


def hand_written(mode):
    """TinyNet trained by a plain loop; the penalty written out for the two selected weights."""
    model = TinyNet(lr=LR)
    x, y = regression_data()
    chosen = [model.net[0].weight, model.net[3].weight]
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for _ in range(EPOCHS):
        for xb, yb in loader(x, y, BATCH):
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(xb), yb)
            if mode == "gradient":
                loss = loss + sum(0.5 * ALPHA * ((w - C) ** 2).sum() for w in chosen)
            loss.backward()
            with torch.no_grad():
                if mode == "decoupled":
                    for w in chosen:
                        w -= LR * ALPHA * (w - C)
                opt.step()
                if mode == "proximal":
                    for w in chosen:
                        w.copy_((w + LR * ALPHA * C) / (1 + LR * ALPHA))
    return model


@pytest.mark.parametrize("mode", ["gradient", "decoupled", "proximal"])
def test_a_user_defined_penalty_runs_in_every_mode_like_a_hand_written_loop(mode):
    model = TinyNet(lr=LR)
    x, y = regression_data()
    trainer(callbacks=[Regularizer(PullTo(ALPHA, C), mode=mode)], max_epochs=EPOCHS).fit(model, loader(x, y, BATCH))
    oracle = hand_written(mode)
    for (name, p), q in zip(model.named_parameters(), oracle.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14, msg=name)
    assert not torch.equal(model.net[0].weight, TinyNet().net[0].weight)


def test_a_penalty_without_prox_says_so_in_proximal_mode():
    class ValueOnly(Penalty):
        def value(self, w, alpha):
            return alpha * w.sum()

    with pytest.raises(NotImplementedError, match="prox"):
        ValueOnly(0.1).prox_(torch.ones(2), 0.1, 0.1)
