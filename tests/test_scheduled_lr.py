"""Every step rule reads the param group's live lr, under an LR scheduler, against independent oracles.

A rule that read the group's initial lr (``group["initial_lr"]``, which every torch scheduler sets) would be the same
in a run and its resume; here it is compared with ``torch.optim.AdamW`` under the same scheduler (decoupled ``L2``
is AdamW's weight decay) and with a hand-written Adam + soft-threshold loop (the preconditioned prox).
"""

import pytest
import torch
from lightning.pytorch import LightningModule
from torch import nn

from lightreg import L1, L2, ElasticNet, Regularizer
from tests.models import loader, regression_data, trainer

LR, ALPHA = 0.05, 0.3


def factor(step):
    """A schedule that moves on every step and is never 1 after the first: any initial-lr rule is off."""
    return 0.2 + 0.8 * ((3 * step) % 7) / 6


class Net(LightningModule):
    def __init__(self, optimizer="adam", weight_decay=0.0):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 16, bias=False), nn.Tanh(), nn.Linear(16, 1, bias=False)).double()
        self.optimizer, self.weight_decay = optimizer, weight_decay

    def training_step(self, batch, batch_idx):
        x, y = batch
        return ((self.net(x) - y) ** 2).mean()

    def configure_optimizers(self):
        if self.optimizer == "adamw":
            opt = torch.optim.AdamW(self.parameters(), lr=LR, weight_decay=self.weight_decay)
        else:
            opt = torch.optim.Adam(self.parameters(), lr=LR)
        return [opt], [{"scheduler": torch.optim.lr_scheduler.LambdaLR(opt, factor), "interval": "step"}]


def test_decoupled_l2_under_a_scheduler_is_adamw_under_it():
    x, y = regression_data()
    ours, adamw = Net(), Net("adamw", weight_decay=ALPHA)
    trainer(callbacks=[Regularizer(L2(ALPHA), mode="decoupled")], max_epochs=3).fit(ours, loader(x, y, 16))
    trainer(max_epochs=3).fit(adamw, loader(x, y, 16))
    for p, q in zip(ours.parameters(), adamw.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
    # The oracle is sensitive to the lr: the same run with a constant lr ends elsewhere.
    constant = Net("adamw", weight_decay=ALPHA)
    constant.configure_optimizers = lambda: torch.optim.AdamW(constant.parameters(), lr=LR, weight_decay=ALPHA)
    trainer(max_epochs=3).fit(constant, loader(x, y, 16))
    assert max((p - q).abs().max() for p, q in zip(constant.parameters(), adamw.parameters())) > 1e-3


def hand_written_adam_prox(x, y, batch, steps_per_epoch, epochs, prox):
    """Adam written out (torch's documented defaults), the LambdaLR factor applied by hand, then ``prox(w, t)`` with
    ``t = lr_k / (sqrt(v / (1 - beta2^k)) + eps)`` computed here from this loop's own moments."""
    model = Net()
    ws = [p.detach().clone() for p in model.parameters()]
    m, v = [torch.zeros_like(w) for w in ws], [torch.zeros_like(w) for w in ws]
    b1, b2, eps, k = 0.9, 0.999, 1e-8, 0
    for _ in range(epochs):
        for i in range(steps_per_epoch):
            params = [w.clone().requires_grad_(True) for w in ws]
            xb, yb = x[i * batch:(i + 1) * batch], y[i * batch:(i + 1) * batch]
            out = torch.tanh(xb @ params[0].T) @ params[1].T
            grads = torch.autograd.grad(((out - yb) ** 2).mean(), params)
            lr = LR * factor(k)  # the live lr of step k (LambdaLR: base lr times the factor of the steps taken)
            k += 1
            for j, g in enumerate(grads):
                m[j] = b1 * m[j] + (1 - b1) * g
                v[j] = b2 * v[j] + (1 - b2) * g * g
                assert (v[j] > 0).all()  # every coordinate stepped: the bound of unstepped ones is not involved
                denom = (v[j] / (1 - b2**k)).sqrt() + eps
                ws[j] = ws[j] - lr * (m[j] / (1 - b1**k)) / denom
                ws[j] = prox(ws[j], lr / denom)
    return ws


@pytest.mark.parametrize("penalty, prox", [
    (L1(ALPHA), lambda w, t: w.sign() * (w.abs() - t * ALPHA).clamp(min=0)),
    (ElasticNet(ALPHA, 0.5), lambda w, t: w.sign() * (w.abs() - t * ALPHA * 0.5).clamp(min=0) / (1 + t * ALPHA * 0.5)),
], ids=["l1", "elastic_net"])
def test_adam_prox_under_a_scheduler_is_the_hand_written_loop(penalty, prox):
    x, y = regression_data()
    model = Net()
    trainer(callbacks=[Regularizer(penalty)], max_epochs=3).fit(model, loader(x, y, 16))
    expected = hand_written_adam_prox(x, y, 16, len(x) // 16, 3, prox)
    for p, q in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.detach(), q, rtol=1e-10, atol=1e-12)
    assert any((p == 0).any() for p in model.parameters())  # the prox acted
