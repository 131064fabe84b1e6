"""Target sparsity with CoupledGroupLasso, counted in coupled groups: the zero level against the prox, real fits."""

from __future__ import annotations

import copy
import math

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightreg import CoupledGroupL0, CoupledGroupLasso, Regularizer, shrink
from tests.models import loader

pytest.importorskip("torch_pruning")


# ---- the zero level of a group, against the prox itself ------------------------------------------------------
def mlp() -> nn.Sequential:
    """Two hidden layers: their groups overlap (layer 2's filters hold layer 0's channels' input slices)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 2)).double()


def bound(net, kind=CoupledGroupLasso):
    penalty = kind(0.0)
    params = [p for _, p in penalty.bind(net, [(n, p) for n, p in net.named_parameters() if p.ndim == 2][:2],
                                          example_inputs=torch.zeros(1, 3, dtype=torch.float64))]
    return penalty, params


def steps_for(params, kind):
    g = torch.Generator().manual_seed(3)
    if kind == "uniform":
        return 0.3
    # Adam-like steps spread over four orders of magnitude, one tensor per parameter
    return [torch.exp(torch.empty_like(p).uniform_(-4, 0, generator=g) * math.log(10)) for p in params]


def group_is_zero(penalty, g: int) -> bool:
    units = [(f, u) for f in penalty.groups.families for u in range(f.units)]
    family, unit = units[g]
    return not bool(family.alive()[unit])


@pytest.mark.parametrize("penalty_kind", [CoupledGroupLasso, CoupledGroupL0], ids=lambda k: k.__name__)
@pytest.mark.parametrize("kind", ["uniform", "per-coordinate"])
def test_each_group_dies_exactly_at_its_zero_level(kind, penalty_kind):
    """Oracle: the prox. At level * (1 + 1e-6) the group is exactly zero, at level * (1 - 1e-6) it is not."""
    net = mlp()
    penalty, params = bound(net, penalty_kind)
    steps = steps_for(params, kind)
    levels = penalty.joint_zero_levels(params, steps)
    assert levels.shape == (9,) and torch.all(levels > 0)
    for g, level in enumerate(levels.tolist()):
        for factor, dies in ((1 + 1e-6, True), (1 - 1e-6, False)):
            trial = copy.deepcopy(net)
            p_trial, trial_params = bound(trial, penalty_kind)
            with torch.no_grad():
                p_trial.apply_prox_(trial_params, steps, level * factor)
            assert group_is_zero(p_trial, g) == dies, (g, factor)
            # every other group dies iff its own level is at most alpha (the levels predict the whole outcome)
            dead = [group_is_zero(p_trial, h) for h in range(len(levels))]
            assert dead == (levels <= level * factor).tolist(), (g, factor)
            if penalty_kind is CoupledGroupL0:  # a hard threshold: every entry of a live group is kept as it was
                for a, b in zip(trial.parameters(), net.parameters(), strict=True):
                    assert torch.all((a == b) | (a == 0))


def test_zero_level_formula_uniform_step():
    """Oracle: ||w_g|| / (t sqrt(|g|)) from the group's entries gathered by hand (torch.linalg.vector_norm)."""
    net = mlp()
    penalty, params = bound(net)
    w0, b0, w2, b2, w4, _ = (p.detach() for p in net.parameters())
    hand = {"0": [torch.cat([w0[j], b0[j:j + 1], w2[:, j]]) for j in range(5)],
            "2": [torch.cat([w2[k], b2[k:k + 1], w4[:, k]]) for k in range(4)]}
    hand = [h for f in penalty.groups.families for h in hand[f.name]]  # in the families' order
    expected = torch.stack([torch.linalg.vector_norm(h) / (0.3 * math.sqrt(h.numel())) for h in hand])
    torch.testing.assert_close(penalty.joint_zero_levels(params, 0.3), expected, rtol=1e-13, atol=0)
    l0, l0_params = bound(net, CoupledGroupL0)  # the cost of removing the group over its entries: Σ w² / (2 t |g|)
    expected = torch.stack([h.square().sum() / (2 * 0.3 * h.numel()) for h in hand])
    torch.testing.assert_close(l0.joint_zero_levels(l0_params, 0.3), expected, rtol=1e-13, atol=0)
    with torch.no_grad():  # R = alpha * (entries of the live groups): kill layer 0's unit 2 by hand
        w0[2], b0[2], w2[:, 2] = 0.0, 0.0, 0.0
    value = sum(l0.value(p, 0.5) for p in l0_params)
    assert value.item() == 0.5 * (sum(h.numel() for h in hand) - (w0.shape[1] + 1 + w2.shape[0]))


def test_a_group_with_an_unstepped_nonzero_tensor_cannot_die():
    """t = 0 for a tensor missing from the step (or lr 0): its nonzero groups have level inf, its zero groups 0."""
    net = mlp()
    penalty, params = bound(net)
    with torch.no_grad():
        net[0].weight[1] = 0.0
        net[0].bias[1] = 0.0
        net[2].weight[:, 1] = 0.0
    steps = [0.0 if p is net[0].bias else 0.3 for p in params]  # layer 0's bias: step 0
    levels = dict(zip([f.name for f in penalty.groups.families],
                      penalty.joint_zero_levels(params, steps).split([f.units for f in penalty.groups.families])))
    assert levels["0"][1] == 0 and torch.all(torch.isinf(levels["0"][[0, 2, 3, 4]]))
    assert torch.all(torch.isfinite(levels["2"])) and torch.all(levels["2"] > 0)


# ---- real fits: a small ResNet-style model -----------------------------------------------------------------
class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))) + x)


class ResNet(pl.LightningModule):
    """stem conv-BN-ReLU (8), a BasicBlock with its residual add, pooling, a linear head."""

    def __init__(self, warmup: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(), Block(8),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
        self.example_input_array = torch.zeros(2, 1, 6, 6)
        self.warmup = warmup

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, _):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=0.01)
        if not self.warmup:
            return opt
        ramp = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, step / 4))  # lr 0 at the first step
        return {"optimizer": opt, "lr_scheduler": {"scheduler": ramp, "interval": "step"}}


def data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(64, 1, 6, 6, generator=g), torch.randint(0, 3, (64,), generator=g)


def fit(target=0.5, max_steps=24, ckpt_path=None, save_dir=None, stop_at=None, warmup=True, penalty=None, **kwargs):
    """Adam with a warm-up from lr 0; the level selected every 3 steps (and at step 15), the zeros held between."""
    x, y = data()
    model = ResNet(warmup)
    reg = Regularizer(penalty or CoupledGroupLasso(0.0), target_sparsity=target, **{"target_every": 3, **kwargs})
    callbacks = [reg]
    if save_dir is not None:
        callbacks.append(pl.callbacks.ModelCheckpoint(dirpath=save_dir, every_n_train_steps=stop_at, save_top_k=-1))
    trainer = pl.Trainer(max_steps=max_steps, callbacks=callbacks, logger=False, enable_checkpointing=save_dir is not None,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(model, loader(x, y, batch_size=16), ckpt_path=ckpt_path)
    return model, reg


@pytest.fixture(scope="module")
def fitted():
    return fit()


def test_the_target_fraction_of_groups_is_exactly_zero_and_shrink_removes_them(fitted):
    model, reg = fitted
    families = reg.penalty.groups.families
    units = sum(f.units for f in families)
    dead = sum(int((~f.alive()).sum()) for f in families)
    # stem + residual stream (one group: the stem's, the block's conv2 and both BNs), conv1's channels
    assert [f.units for f in families] == [8, 8] and dead == round(0.5 * units) == 8
    metrics = reg.metrics()
    assert metrics["reg/coupled_group_lasso/sparsity"] == dead / units
    assert metrics["reg/coupled_group_lasso/groups_alive"] == units - dead and metrics["reg/coupled_group_lasso/groups"] == units
    assert reg.target.window.freeze == 16 and reg.alpha == 0.0
    x, _ = data()
    small = shrink(model)
    with torch.no_grad():
        torch.testing.assert_close(small.eval()(x), model.eval()(x), rtol=1e-5, atol=1e-6)
    widths = [m.out_channels for m in small.modules() if isinstance(m, nn.Conv2d)]
    alive = [int(f.alive().sum()) for f in families]
    assert sorted(set(widths)) == sorted(set(alive)) and sum(p.numel() for p in small.parameters()) < sum(
        p.numel() for p in model.parameters())


def test_coupled_group_l0_target_zeroes_the_fraction_and_keeps_the_survivors_unshrunk():
    model, reg = fit(penalty=CoupledGroupL0(0.0))
    families = reg.penalty.groups.families
    assert sum(int((~f.alive()).sum()) for f in families) == 8
    assert reg.metrics()["reg/coupled_group_l0/sparsity"] == 0.5
    x, _ = data()
    small = shrink(model)
    with torch.no_grad():
        torch.testing.assert_close(small.eval()(x), model.eval()(x), rtol=1e-5, atol=1e-6)


def test_a_step_with_lr_zero_selects_and_zeroes_nothing():
    """Oracle: Adam at lr 0 moves nothing, so after the first step (warm-up from 0) the weights are the initial ones."""
    model, reg = fit(max_steps=1, target_ramp=(0, 8))
    for a, b in zip(model.parameters(), ResNet().parameters(), strict=True):
        assert torch.equal(a, b)
    assert reg.alpha == 0.0 and reg.target.pending


@pytest.mark.parametrize("stop_at", [8, 20], ids=["in-the-ramp", "frozen"])  # epoch ends: 4 batches each
def test_resume_is_bit_exact(tmp_path, fitted, stop_at):
    full, _ = fitted
    fit(max_steps=stop_at, save_dir=tmp_path, stop_at=stop_at, target_ramp=(0, 16))
    (ckpt,) = tmp_path.glob("*.ckpt")
    resumed, _ = fit(ckpt_path=ckpt, target_ramp=(0, 16))
    for (name, p), q in zip(full.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q), name


def test_a_fit_that_ends_early_warns_with_the_groups_reached():
    with pytest.warns(UserWarning, match=r"sparsity reached 0\.\d{4} \(the fraction of coupled groups exactly zero\) "
                                         r"against target_sparsity=0.5"):
        fit(max_steps=6, target_ramp=(0, 40))


def test_the_app_removes_the_target_share_of_channels_with_the_same_outputs(tmp_path):
    """lightreg-train model=cnn penalty=coupled_group_l0 penalty.target_sparsity=0.5 shrink=true (docs/structured.md)."""
    from lightreg.app.config import RunContext
    from lightreg.app.train import run
    from tests.test_app_run import compose_cfg

    cfg = compose_cfg("model=cnn", "data=digits", "penalty=coupled_group_l0", "penalty.target_sparsity=0.5",
                      "trainer.max_epochs=2", "logger=none", "progress_bar=false", "report=false", "shrink=true")
    metrics = run(cfg, RunContext(output_dir=tmp_path))
    assert metrics["reg/coupled_group_l0/sparsity"] == 0.5 and metrics["reg/coupled_group_l0/groups_alive"] == 12
    assert metrics["shrink/max_abs_diff"] <= 1e-5 and metrics["shrink/params_after"] < metrics["shrink/params_before"]
    assert metrics["shrink/test/acc"] == metrics["test/acc"]


def test_a_frozen_tensor_is_never_zeroed_and_a_target_it_blocks_is_reported():
    """The block's first BatchNorm frozen (requires_grad=False): its groups (conv1's channels) hold weights no step
    moves, level inf, so they can never die. A target of 0.75 (12 of 16 groups) can then reach only the 8 residual
    groups: those die, the frozen BatchNorm stays exactly as it was, and a warning says how many could."""
    x, y = data()
    model = ResNet(warmup=False)
    bn = model.net[3].bn1
    bn.weight.requires_grad_(False), bn.bias.requires_grad_(False)
    frozen = [bn.weight.detach().clone(), bn.bias.detach().clone()]
    reg = Regularizer(CoupledGroupLasso(0.0), target_sparsity=0.75, target_every=3)
    trainer = pl.Trainer(max_steps=12, callbacks=[reg], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    with pytest.warns(UserWarning, match="only 8 of 16 coupled groups can reach zero"):
        trainer.fit(model, loader(x, y, batch_size=16))
    assert torch.equal(bn.weight, frozen[0]) and torch.equal(bn.bias, frozen[1])
    residual, inner = reg.penalty.groups.families
    assert int((~residual.alive()).sum()) == 8 and bool(inner.alive().all())


def test_a_model_without_a_coupled_group_is_refused_before_any_weight_changes():
    """A lone Linear: its only channels are the model's output, so there is nothing to penalise (a target would
    silently do nothing): a ValueError that says why, at fit start."""

    class Lone(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.l, self.example_input_array = nn.Linear(4, 3), torch.zeros(2, 4)

        def forward(self, x):
            return self.l(x)

        def training_step(self, batch, _):
            return self(batch).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    model = Lone()
    before = model.l.weight.detach().clone()
    trainer = pl.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[Regularizer(CoupledGroupL0(0.0), target_sparsity=0.5)])
    with pytest.raises(ValueError, match="finds no coupled group .* l: the model's output"):
        trainer.fit(model, torch.utils.data.DataLoader(torch.randn(8, 4), batch_size=4))
    assert torch.equal(model.l.weight, before)
