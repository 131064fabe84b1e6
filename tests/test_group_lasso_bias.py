"""GroupLasso(with_bias=True): each unit's group is its weight row plus its bias entry. The pair math against autograd
of the written-out formula and the closed-form prox of each concatenated group; the Regularizer against hand-written
float64 loops; and the point of it: a unit it kills outputs exactly relu(0) = 0, so shrink cuts it through zero padding."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightreg import GroupLasso, Regularizer, shrink, shrink_report

ALPHA, LR, STEPS = 0.3, 0.1, 30


def explicit_value(w, b, alpha):
    """``alpha * sum_g sqrt(|g|) * ||(w_g, b_g)||``, one group at a time, |g| counting the bias entry."""
    groups = [torch.cat([w[i].reshape(-1), b[i : i + 1]]) for i in range(w.shape[0])]
    return alpha * sum(math.sqrt(g.numel()) * torch.linalg.vector_norm(g) for g in groups)


def explicit_prox(w, b, step, alpha):
    """The closed-form prox of each concatenated group: ``v * max(0, 1 - step * alpha * sqrt(|g|) / ||v||)``."""
    w, b = w.clone(), b.clone()
    for i in range(w.shape[0]):
        v = torch.cat([w[i].reshape(-1), b[i : i + 1]])
        norm = float(torch.linalg.vector_norm(v))
        factor = max(0.0, 1.0 - step * alpha * math.sqrt(v.numel()) / norm) if norm > 0 else 0.0
        w[i], b[i] = w[i] * factor, b[i] * factor
    return w, b


def pair(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    w, b = torch.randn(*shape, generator=g, dtype=torch.float64), torch.randn(shape[0], generator=g, dtype=torch.float64)
    w[1], b[1] = 0.0, 0.0  # an all-zero group stays zero, with gradient 0
    w[2] *= 0.01  # a small group, zeroed by the prox below
    b[2] *= 0.01
    return w, b


@pytest.mark.parametrize("shape", [(4, 3), (4, 2, 3, 3)])
def test_value_and_gradient_are_autograd_of_the_formula(shape):
    w, b = pair(shape)
    penalty = GroupLasso(ALPHA, with_bias=True)
    wr, br = w.clone().requires_grad_(), b.clone().requires_grad_()
    explicit = explicit_value(wr, br, ALPHA)
    explicit.backward()
    assert penalty.pair_value(w, b, ALPHA).item() == pytest.approx(explicit.item(), rel=1e-14)
    dw, db = penalty.pair_gradient(w, b, ALPHA)
    torch.testing.assert_close(dw[[0, 2, 3]], wr.grad[[0, 2, 3]], rtol=1e-13, atol=0)  # row 1: the kink, 0 by convention
    torch.testing.assert_close(db[[0, 2, 3]], br.grad[[0, 2, 3]], rtol=1e-13, atol=0)
    assert not dw[1].any() and db[1] == 0


@pytest.mark.parametrize("shape", [(4, 3), (4, 2, 3, 3)])
def test_prox_is_the_closed_form_of_each_concatenated_group(shape):
    w, b = pair(shape)
    expected_w, expected_b = explicit_prox(w, b, LR, ALPHA)
    GroupLasso(ALPHA, with_bias=True).pair_prox_(w, b, LR, ALPHA)
    torch.testing.assert_close(w, expected_w, rtol=1e-14, atol=0)
    torch.testing.assert_close(b, expected_b, rtol=1e-14, atol=0)
    assert not w[2].any() and b[2] == 0  # the small unit went, its bias with it


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="with_bias=True needs dim=0"):
        GroupLasso(0.1, dim=1, with_bias=True)
    with pytest.raises(TypeError, match="with_bias must be a bool"):
        GroupLasso(0.1, with_bias=1)
    with pytest.raises(ValueError, match=r"a bias of shape \(3,\) cannot join the 4 row groups"):
        GroupLasso(0.1, with_bias=True).pair_biases([(torch.zeros(4, 2), torch.zeros(3))])
    assert repr(GroupLasso(0.1, with_bias=True)) == "GroupLasso(alpha=0.1, dim=0, with_bias=True)"
    assert GroupLasso(0.1, with_bias=True) != GroupLasso(0.1)


class Net(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 2)).double()

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return nn.functional.mse_loss(self(batch[0]), batch[1])

    optimizer = torch.optim.SGD

    def configure_optimizers(self):
        return self.optimizer(self.parameters(), lr=LR)


class AdamNet(Net):
    optimizer = torch.optim.Adam


def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(24, 5, generator=g, dtype=torch.float64), torch.randn(24, 2, generator=g, dtype=torch.float64)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Bit-exact comparisons with a hand-written loop: one thread sums in one order."""


@pytest.mark.parametrize("mode, net", [("proximal", Net), ("gradient", Net), ("proximal", AdamNet)],
                         ids=["proximal", "gradient", "proximal-adam"])
def test_regularizer_matches_a_hand_written_loop(mode, net, recwarn):
    """Full-batch float64: the callback against the explicit prox after each step (proximal), or autograd of the
    explicit formula added to the loss (gradient). Only net.0 is selected: its bias joins, net.2 stays free. With
    Adam the pair's prox takes the plain lr (it has no per-coordinate form), and says so once."""
    model, oracle = net(), net()
    x, y = batch()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=len(x))
    reg = Regularizer(GroupLasso(ALPHA, with_bias=True), mode=mode, include="net.0.weight")
    pl.Trainer(max_steps=STEPS, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, precision="64-true", callbacks=[reg]).fit(model, loader)
    plain_lr = [w for w in recwarn if "no prox with a per-coordinate step" in str(w.message)]
    assert len(plain_lr) == (net is AdamNet)
    opt = net.optimizer(oracle.parameters(), lr=LR)
    layer = oracle.net[0]
    for _ in range(STEPS):
        opt.zero_grad()
        loss = nn.functional.mse_loss(oracle(x), y)
        if mode == "gradient":
            loss = loss + explicit_value(layer.weight, layer.bias, ALPHA)
        loss.backward()
        opt.step()
        if mode == "proximal":
            with torch.no_grad():
                w, b = explicit_prox(layer.weight, layer.bias, LR, ALPHA)
                layer.weight.copy_(w)
                layer.bias.copy_(b)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, oracle.get_parameter(name), rtol=0, atol=1e-12)
    expected = explicit_value(model.net[0].weight, model.net[0].bias, ALPHA).item()
    assert reg.metrics()["reg/group_lasso/penalty"].item() == pytest.approx(expected, rel=1e-12)
    if mode == "proximal" and net is Net:  # plain SGD at this strength kills units; Adam's steps keep them moving
        dead = (model.net[0].weight == 0).all(1)
        assert dead.any() and not model.net[0].bias[dead].any()  # whole units, bias included


class ConvNet(Net):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 4, 3, padding=1), nn.ReLU(),
                                 nn.Flatten(), nn.Linear(4 * 16, 2)).double()


@pytest.mark.parametrize("with_bias, cut_all", [(True, True), (False, False)])
def test_units_killed_with_their_bias_are_cut_through_zero_padding(with_bias, cut_all):
    """Without the bias in the group a dead filter still outputs relu(b): the padded conv after it keeps it."""
    model = ConvNet()
    x = torch.randn(24, 1, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        model.net[0].bias.copy_(torch.linspace(0.2, 0.7, 6, dtype=torch.float64))  # relu(b) > 0: not foldable
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.randn(24, 2, dtype=torch.float64)), batch_size=24)
    reg = Regularizer(GroupLasso(0.2, with_bias=with_bias), include="net.0.weight")
    pl.Trainer(max_steps=10, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, precision="64-true", callbacks=[reg]).fit(model, loader)
    dead = int((model.net[0].weight == 0).all(dim=(1, 2, 3)).sum())
    assert 2 <= dead < 6  # some filters died, not all
    small = shrink(model.net.eval())
    row = shrink_report(small).rows[0]
    assert (row.units_before - row.units_after == dead) == cut_all
    assert (row.kept_constant == 0) == cut_all and not row.collapsed
    with torch.no_grad():
        assert (small(x) - model.net(x)).abs().max() <= 1e-10
