"""CoupledGroupLasso: the prox over groups spanning several tensors, against independent oracles."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightreg import CoupledGroupLasso, GroupLasso, Regularizer, load_shrunk, save_shrunk, shrink
from lightreg.penalties.coupled_group_lasso import family_value
from tests.models import loader

pytest.importorskip("torch_pruning")


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double()


def bound(net: nn.Module, alpha: float) -> CoupledGroupLasso:
    penalty = CoupledGroupLasso(alpha)
    penalty.bind(net, [("0.weight", net[0].weight)], example_inputs=torch.zeros(1, 3, dtype=torch.float64))
    return penalty


def rows(net: nn.Module) -> torch.Tensor:
    """The group of unit j as row j: W0[j, :], b0[j], W2[:, j] (the oracle's layout, written out by hand)."""
    return torch.cat([net[0].weight, net[0].bias[:, None], net[2].weight.T], 1)


def test_group_is_filter_bias_and_next_input_slice():
    net = mlp()
    family = bound(net, 0.1).groups.families[0]
    assert {(s.name, s.dim) for s in family.slices} == {("0.weight", 0), ("0.bias", 0), ("2.weight", 1)}
    assert family.sizes.tolist() == [6.0] * 4


@pytest.mark.parametrize("adaptive", [False, True])
def test_prox_is_group_lasso_on_the_concatenated_group(adaptive):
    """Oracle: GroupLasso(dim=0) on the matrix whose row j is the whole group j, same per-coordinate steps."""
    net, g = mlp(), torch.Generator().manual_seed(1)
    penalty, alpha = bound(net, 0.3), 0.3
    params = [net[0].weight, net[0].bias, net[2].weight]
    with torch.no_grad():
        net[0].weight[1] *= 0.02  # unit 1 dies, the others shrink
        net[2].weight[:, 1] *= 0.02
        net[0].bias[1] *= 0.02
    if adaptive:  # steps spread over 4 orders of magnitude, as Adam's are
        steps = [torch.exp(torch.empty_like(p).uniform_(-4, 0, generator=g) * math.log(10)) for p in params]
        t = torch.cat([steps[0], steps[1][:, None], steps[2].T], 1)
    else:
        steps, t = 0.5, 0.5
    expected = rows(net).detach().clone()
    oracle = GroupLasso(alpha, dim=0)
    if adaptive:
        oracle._metric_prox_(expected, t, alpha)
    else:
        oracle.prox_(expected, t, alpha)
    with torch.no_grad():
        penalty.apply_prox_(params, steps, alpha)
    torch.testing.assert_close(rows(net), expected, rtol=1e-12, atol=1e-14)
    assert torch.all(rows(net)[[0, 2, 3]].abs().sum(1) > 0)
    assert adaptive or torch.all(rows(net)[1] == 0)


def test_uniform_step_closed_form():
    net = mlp()
    penalty = bound(net, 0.2)
    u = rows(net).detach().clone()
    with torch.no_grad():
        penalty.apply_prox_([net[0].weight, net[0].bias, net[2].weight], 0.3, 0.2)
    factor = (1 - 0.3 * 0.2 * math.sqrt(6) / torch.linalg.vector_norm(u, dim=1)).clamp(min=0)
    torch.testing.assert_close(rows(net), u * factor[:, None], rtol=1e-13, atol=1e-15)


def test_tensor_not_stepped_stays_and_the_rest_solves_the_secular_equation():
    """A tensor without a step (no gradient) has t = 0: unchanged; the others satisfy v_i = u_i r / (r + λ t)
    with r = ||v_g|| (the prox's optimality condition), and the group cannot die while that tensor is nonzero."""
    net = mlp()
    penalty, alpha, t = bound(net, 5.0), 5.0, 0.1
    frozen, u = net[2].weight.detach().clone(), rows(net).detach().clone()
    with torch.no_grad():
        penalty.apply_prox_([net[0].weight, net[0].bias], t, alpha)  # 2.weight is not in the step
    assert torch.equal(net[2].weight, frozen)
    v, lam = rows(net).detach(), alpha * math.sqrt(6)
    r = torch.linalg.vector_norm(v, dim=1, keepdim=True)
    steps = torch.cat([torch.full((4, 4), t, dtype=torch.float64), torch.zeros(4, 2, dtype=torch.float64)], 1)
    torch.testing.assert_close(v, u * r / (r + lam * steps), rtol=1e-12, atol=1e-14)
    assert torch.all(r > 0)


def test_gradient_is_autograd_of_the_value():
    net = mlp()
    penalty = bound(net, 0.7)
    family = penalty.groups.families[0]
    value = family_value(family, 0.7)
    grads = torch.autograd.grad(value, [net[0].weight, net[0].bias, net[2].weight])
    for p, g in zip([net[0].weight, net[0].bias, net[2].weight], grads, strict=True):
        torch.testing.assert_close(penalty.gradient(p, 0.7), g, rtol=1e-12, atol=1e-14)
    total = sum(penalty.value(p, 0.7) for p in [net[0].weight, net[0].bias, net[2].weight])
    oracle = 0.7 * math.sqrt(6) * torch.linalg.vector_norm(rows(net), dim=1).sum()
    torch.testing.assert_close(total, oracle.detach())


class ConvNet(pl.LightningModule):
    """conv-BN-ReLU twice, a linear head; example_input_array for the trace."""

    def __init__(self, two_optimizers: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                                 nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                                 nn.Flatten(), nn.Linear(6 * 16, 3)).double()
        self.example_input_array = torch.zeros(2, 1, 4, 4, dtype=torch.float64)
        self.two_optimizers = two_optimizers
        self.automatic_optimization = not two_optimizers

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, _):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        if self.two_optimizers:
            opts = self.optimizers()
            for o in opts:
                o.zero_grad()
            self.manual_backward(loss)
            for o in opts:
                o.step()
        return loss

    def configure_optimizers(self):
        if self.two_optimizers:
            bn = [p for n, p in self.named_parameters() if n.startswith("net.1.")]
            rest = [p for n, p in self.named_parameters() if not n.startswith("net.1.")]
            return torch.optim.SGD(rest, lr=0.1), torch.optim.SGD(bn, lr=0.1)
        return torch.optim.SGD(self.parameters(), lr=0.1)


def data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(32, 1, 4, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (32,), generator=g)


def oracle_prox(net: nn.Module, lr: float, alpha: float) -> None:
    """Each channel group by hand (conv 0's channels and conv 3's): its filter, bias, BN scale and shift, and the
    next layer's input slice, scaled by max(0, 1 - lr alpha sqrt|g| / ||w_g||), every factor taken from the weights
    as the step left them (groups overlap: conv 3's filters hold conv 0's channels' input slices)."""
    nxt = {0: lambda j: net[3].weight[:, j], 3: lambda j: net[7].weight.view(3, 6, 16)[:, j]}
    scaled = []
    for k in (0, 3):
        conv, bn = net[k], net[k + 1]
        for j in range(conv.out_channels):
            parts = [conv.weight[j], conv.bias[j:j + 1], bn.weight[j:j + 1], bn.bias[j:j + 1], nxt[k](j)]
            size = sum(p.numel() for p in parts)
            norm = torch.sqrt(sum(p.square().sum() for p in parts))
            scaled.append((parts, (1 - lr * alpha * math.sqrt(size) / norm).clamp(min=0) if norm > 0 else 0.0))
    for parts, factor in scaled:
        for p in parts:
            p.mul_(factor)


def test_regularizer_fit_matches_a_hand_loop(tmp_path):
    """Oracle: full-batch SGD written by hand, then each coupled group's closed-form prox applied by hand."""
    x, y = data()
    model, alpha = ConvNet(), 0.25
    reg = Regularizer(CoupledGroupLasso(alpha))
    trainer = pl.Trainer(max_epochs=6, callbacks=[reg], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1)
    trainer.fit(model, loader(x, y))
    hand = ConvNet()
    opt = torch.optim.SGD(hand.parameters(), lr=0.1)
    for _ in range(6):
        opt.zero_grad()
        nn.functional.cross_entropy(hand(x), y).backward()
        opt.step()
        with torch.no_grad():
            oracle_prox(hand.net, 0.1, alpha)
    for (n, a), b in zip(model.named_parameters(), hand.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=n)
    assert {n for n, _ in reg.penalised()} == {"net.0.weight", "net.0.bias", "net.1.weight", "net.1.bias",
                                                "net.3.weight", "net.3.bias", "net.4.weight", "net.4.bias", "net.7.weight"}
    metrics = reg.metrics()
    alive = [metrics[f"reg/coupled_group_lasso/groups_alive/net.{k}"] for k in (0, 3)]
    assert metrics["reg/coupled_group_lasso/groups_alive"] == sum(alive) and 0 < sum(alive) < 12
    # What the app does after such a fit: shrink the LightningModule (traced from its example_input_array), save it.
    small = shrink(model)
    assert small.net[0].out_channels == max(int(alive[0]), 1) and small.net[3].out_channels == max(int(alive[1]), 1)
    save_shrunk(small, tmp_path / "small.pt2")
    loaded, report = load_shrunk(tmp_path / "small.pt2")
    torch.testing.assert_close(loaded(x), model.eval()(x), rtol=1e-9, atol=1e-10)
    assert report["params_after"] == sum(p.numel() for p in small.parameters())


def test_group_split_over_two_optimizers_is_refused():
    x, y = data()
    model = ConvNet(two_optimizers=True)
    trainer = pl.Trainer(max_epochs=1, callbacks=[Regularizer(CoupledGroupLasso(0.05))], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(ValueError, match="coupled group 'net.0'.*'net.1.weight'.*one optimizer"):
        trainer.fit(model, loader(x, y))


def test_without_example_inputs_is_refused():
    net = mlp()
    with pytest.raises(ValueError, match="example_inputs is None and Sequential has no example_input_array"):
        CoupledGroupLasso(0.1).bind(net, [("0.weight", net[0].weight)])


def test_gradient_mode_is_the_penalty_in_the_loss():
    """Oracle: the same full-batch SGD with family_value (autograd) added to the loss."""
    x, y = data()
    model, alpha = ConvNet(), 0.05
    trainer = pl.Trainer(max_epochs=3, callbacks=[Regularizer(CoupledGroupLasso(alpha), mode="gradient")], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, loader(x, y))
    hand = ConvNet()
    penalty = CoupledGroupLasso(alpha)
    penalty.bind(hand, [(n, p) for n, p in hand.named_parameters() if p.ndim >= 2], example_inputs=hand.example_input_array)
    opt = torch.optim.SGD(hand.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(hand(x), y) + sum(family_value(f, alpha) for f in penalty.groups.families)
        loss.backward()
        opt.step()
    for a, b in zip(model.parameters(), hand.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_target_sparsity_needs_the_proximal_mode():
    with pytest.raises(ValueError, match="target_sparsity=0.5 needs mode='proximal'.*CoupledGroupLasso"):
        Regularizer(CoupledGroupLasso(0.1), mode="gradient", target_sparsity=0.5)
    Regularizer(CoupledGroupLasso(0.0), target_sparsity=0.5)  # tests/test_coupled_target.py
