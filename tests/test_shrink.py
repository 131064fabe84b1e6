"""shrink: the same outputs (float64, 1e-10) from fewer units; the widths and counts it reports match the zeros
placed by hand; the original is untouched; what it cannot follow is refused by name."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightreg import GroupLasso, print_shrink_report, shrink, shrink_report
from lightreg.app.data import sparse_linear_problem
from lightreg.app.models import CNN, MLP

TOL = 1e-10


def _randomise_norms(net: nn.Module, gen: torch.Generator) -> None:
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=gen, dtype=torch.float64) * 2 - 1)
            m.running_var.copy_(torch.rand(n, generator=gen, dtype=torch.float64) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=gen, dtype=torch.float64) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=gen, dtype=torch.float64) - 0.5)


def build(*layers: nn.Module, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    net = nn.Sequential(*layers).double().eval()
    with torch.no_grad():
        _randomise_norms(net, torch.Generator().manual_seed(seed))
    return net


def same_outputs(net: nn.Module, x: torch.Tensor, **kwargs):
    """Shrink ``net``; check the outputs (the original net is the oracle) and that the original is untouched."""
    state = copy.deepcopy(net.state_dict())
    small = shrink(net, **kwargs)
    report = shrink_report(small)
    xs = x if report.kept_inputs is None else x[:, list(report.kept_inputs)]
    with torch.no_grad():
        assert (small(xs) - net(x)).abs().max().item() <= TOL
    after = net.state_dict()
    assert state.keys() == after.keys() and all(torch.equal(state[k], after[k]) for k in state)
    assert report.params_before == sum(p.numel() for p in net.parameters())
    assert report.params_after == sum(p.numel() for p in small.parameters())
    return small, report


def x_of(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def widths(report) -> list[tuple[int, int]]:
    return [(r.units_after, r.inputs_after) for r in report.rows]


@torch.no_grad()
def test_dead_rows_fold_their_constant_into_the_next_bias():
    net = build(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 5), nn.Sigmoid(), nn.Linear(5, 3))
    net[0].weight[[1, 4, 5]] = 0.0  # constant units GELU(b): folded into net.2's bias
    net[2].weight[[0, 3]] = 0.0  # sigmoid(b) != 0: folded into net.4's bias
    small, report = same_outputs(net, x_of(9, 6))
    assert widths(report) == [(5, 6), (3, 5), (3, 3)]
    assert [(r.folded, r.unused, r.kept_constant) for r in report.rows] == [(3, 0, 0), (2, 0, 0), (0, 0, 0)]
    assert small[2].weight.shape == (3, 5) and report.params_after == 5 * 7 + 3 * 6 + 3 * 4


@torch.no_grad()
def test_dead_columns_are_cut_and_cuts_cascade():
    net = build(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5, bias=False), nn.Tanh(), nn.Linear(5, 3))
    net[4].weight[:, [1, 2]] = 0.0  # net.2 units 1, 2 are never read
    net[2].weight[:, 7] = 0.0  # net.0 unit 7 is never read
    net[2].weight[[3], :] = 0.0  # tanh(0) = 0: cut without a bias to fold into
    net[2].weight[:, 0] = 0.0
    net[2].weight[[1, 2], 0] = 1.0  # net.0 unit 0 feeds only units about to be cut: it goes on the next pass
    small, report = same_outputs(net, x_of(9, 6))
    assert widths(report) == [(6, 6), (2, 6), (3, 2)]
    assert [(r.folded, r.unused) for r in report.rows] == [(0, 2), (1, 2), (0, 0)]
    assert small[2].bias is None  # nothing was folded into it


@torch.no_grad()
def test_rows_and_columns_with_batch_norm_in_eval_mode():
    net = build(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.LeakyReLU(0.1), nn.Dropout(0.3), nn.Linear(7, 4),
                nn.SiLU(), nn.BatchNorm1d(4), nn.Linear(4, 2))
    net[0].weight[[0, 2]] = 0.0  # leaky_relu(BN(b)): folded through the batch norm
    net[4].weight[:, [5]] = 0.0
    net[7].weight[:, 1] = 0.0
    small, report = same_outputs(net, x_of(11, 5))
    assert widths(report) == [(4, 5), (3, 4), (2, 3)]
    assert small[1].num_features == 4 and small[6].running_mean.shape == (3,)


@torch.no_grad()
def test_batch_norm_in_training_mode_is_refused_by_name():
    net = build(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    net[1].train()
    with pytest.raises(ValueError, match=r"'1' \(BatchNorm1d\) is in training mode"):
        shrink(net)


@torch.no_grad()
def test_a_layer_that_dies_completely_leaves_a_constant_model():
    net = build(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5), nn.Sigmoid(), nn.Linear(5, 3))
    net[2].weight.zero_()  # every unit of net.2 outputs sigmoid(b): the output no longer depends on x
    small, report = same_outputs(net, x_of(9, 6))
    assert widths(report) == [(1, 6), (1, 1), (3, 1)]
    assert [r.collapsed for r in report.rows] == [True, True, False] and report.constant_output
    assert torch.equal(small(x_of(2, 6, seed=5))[0], small(x_of(2, 6, seed=6))[1])
    assert torch.count_nonzero(small[4].weight) == 0  # the stand-in unit is zero in and out


def conv_net(avg_pool: nn.Module | None = None) -> nn.Sequential:
    return build(
        nn.Unflatten(1, (2, 6, 6)), nn.Conv2d(2, 5, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(5),
        nn.Conv2d(5, 6, 3, padding=1), nn.ReLU(), avg_pool or nn.MaxPool2d(2), nn.Conv2d(6, 4, 1), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 9, 3),
    )


@torch.no_grad()
def test_cnn_folds_exactly_where_no_zero_padding_reads_the_constant():
    net = conv_net()
    net[1].weight[[0, 3]] = 0.0
    net[1].bias[0], net[1].bias[3] = -1.0, 0.5  # relu, BN: 0 (cut) and BN(0.5) != 0 (kept: net.4 pads with zeros)
    net[3].running_mean[0], net[3].bias[0] = 0.0, 0.0  # BN(0) = 0 on channel 0
    net[4].weight[[2, 5]] = 0.0  # relu(bias) through max-pooling into a 1x1 conv (no padding): folded
    net[4].bias[2], net[4].bias[5] = 0.3, -0.2
    net[7].weight[1] = 0.0  # folded into the Linear after Flatten, over its 9-column block
    net[7].bias[1] = 0.7
    net[10].weight.view(3, 4, 9)[:, 3] = 0.0  # the block of channel 3 is never read
    small, report = same_outputs(net, x_of(4, 72))
    assert widths(report) == [(4, 2), (4, 4), (2, 4), (3, 18)]
    assert [(r.folded, r.unused, r.kept_constant) for r in report.rows] == [(1, 0, 1), (2, 0, 0), (1, 1, 0), (0, 0, 0)]
    assert not report.rows[0].exact and "'4'" in report.rows[0].note


@torch.no_grad()
def test_average_pooling_over_padded_zeros_keeps_nonzero_constants():
    net = conv_net(nn.AvgPool2d(2, padding=1, count_include_pad=True))
    net[10] = nn.Linear(4 * 16, 3).double()
    net[4].weight[[2, 5]] = 0.0
    net[4].bias[2], net[4].bias[5] = 0.3, -0.2  # relu: 0.3 is kept (the border averages zeros in), 0 is cut
    _, report = same_outputs(net, x_of(4, 72))
    assert (report.rows[1].folded, report.rows[1].kept_constant) == (1, 1)


@torch.no_grad()
def test_drop_inputs_keeps_exactly_the_columns_in_use():
    net = build(nn.BatchNorm1d(7), nn.Tanh(), nn.Linear(7, 4), nn.ReLU(), nn.Linear(4, 2))
    net[2].weight[:, [0, 3, 4]] = 0.0
    net[2].weight[2, 6] = 0.0
    net[4].weight[:, 1] = 0.0
    net[2].weight[:, 5] = 0.0
    net[2].weight[1, 5] = 1.0  # column 5 is read only by unit 1, which is never read: dropped on the next pass
    small, report = same_outputs(net, x_of(6, 7), drop_inputs=True)
    assert report.kept_inputs == (1, 2, 6) and report.input_width == 7
    assert small[0].num_features == 3


@torch.no_grad()
def test_drop_inputs_through_an_unflatten_keeps_whole_channels():
    net = conv_net()
    net[1].weight[:, 0] = 0.0  # input channel 0 is never read: its 36 pixels go
    small, report = same_outputs(net, x_of(4, 72), drop_inputs=True)
    assert report.kept_inputs == tuple(range(36, 72))
    assert small[0].unflattened_size == (1, 6, 6)


@torch.no_grad()
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_the_apps_models(kind):
    kwargs = dict(task="classification", in_features=64, num_outputs=10, input_shape=(1, 8, 8))
    model = (MLP(depth=2, width=16, **kwargs) if kind == "mlp" else CNN(channels=4, **kwargs)).double().eval()
    first, second = [m for m in model.net if isinstance(m, (nn.Linear, nn.Conv2d))][:2]
    first.weight[::3] = 0.0
    second.weight[1::4] = 0.0
    small, report = same_outputs(model.net, x_of(5, 64))
    assert report.params_after < report.params_before
    # The app's models carry an example_input_array: the whole LightningModule is traced and cut the same way.
    model.example_input_array = model.example_input_array.double()
    whole = shrink(model)
    torch.testing.assert_close(whole(x_of(5, 64)), model(x_of(5, 64)), rtol=1e-12, atol=1e-12)
    assert sum(p.numel() for p in whole.net.parameters()) == report.params_after


@pytest.mark.parametrize("between, error, match", [
    (nn.Softmax(dim=1), TypeError, r"cannot follow '1' \(Softmax\) between '0' and '2'"),
    (nn.Sequential(nn.ReLU(), nn.ModuleList([nn.Tanh()])), TypeError, r"'1\.1' \(ModuleList\)"),
    (nn.Flatten(0), ValueError, r"'1': shrink follows only Flatten\(start_dim=1"),
    (nn.BatchNorm1d(4, track_running_stats=False), ValueError, r"track_running_stats=False"),
])
def test_what_it_cannot_follow_is_named(between, error, match):
    net = build(nn.Linear(3, 4), between, nn.Linear(4, 2))
    with pytest.raises(error, match=match):
        shrink(net)


def test_bad_structures_are_named():
    with pytest.raises(ValueError, match=r"'2' \(Linear\) acts on the last axis of '0'"):
        shrink(build(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Linear(2, 2)))
    with pytest.raises(ValueError, match=r"groups=2"):
        shrink(build(nn.Conv2d(2, 2, 3, groups=2), nn.Conv2d(2, 2, 1)))
    with pytest.raises(ValueError, match=r"no Linear or Conv2d"):
        shrink(nn.Sequential(nn.ReLU()))
    with pytest.raises(TypeError, match=r"drop_inputs must be a bool"):
        shrink(build(nn.Linear(2, 2)), drop_inputs=1)
    with pytest.raises(TypeError, match=r"drop_inputs=True: shrink cannot follow '0' \(Flatten\)"):
        shrink(build(nn.Flatten(), nn.Linear(4, 2)), drop_inputs=True)
    with pytest.raises(TypeError, match=r"not made by lightreg.shrink"):
        shrink_report(nn.Linear(2, 2))


def test_group_lasso_fit_keeps_exactly_the_true_inputs(capsys, one_thread):
    """Proximal full-batch SGD with a column group lasso on the first layer, where only 5 of 50 inputs matter:
    the shrunk model takes exactly those 5 (the problem's own support is the oracle), with the same outputs."""
    x, y, support = sparse_linear_problem(200, 50, 5, noise=0.1, seed=0)
    x, y = torch.as_tensor(x), torch.as_tensor(y).unsqueeze(1)
    y = y / y.std()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(50, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    lr, penalty = 0.2, GroupLasso(0.01, dim=1)
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    for _ in range(400):
        opt.zero_grad()
        nn.functional.mse_loss(net(x), y).backward()
        opt.step()
        with torch.no_grad():
            penalty.prox_(net[0].weight, lr, penalty.alpha)
    small, report = same_outputs(net, x, drop_inputs=True)
    assert report.kept_inputs == tuple(support.nonzero()[0].tolist())
    assert small[0].in_features == 5
    print_shrink_report(report)
    out = capsys.readouterr().out
    assert "50 -> 5" in out and "inputs kept: 5 of 50" in out
