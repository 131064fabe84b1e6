"""The per-optimizer binding cache: hit while the parameter set is the same, resolved again when it changes."""

import torch
from torch import nn

from lightreg.callbacks.param_groups import Binding, resolve


def make():
    net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    selected = [("0.weight", net[0].weight), ("1.weight", net[1].weight)]
    opt = torch.optim.SGD([{"params": [net[0].weight, net[0].bias], "lr": 0.1}, {"params": [net[1].bias]}], lr=1.0)
    return net, selected, opt


def layout(groups):
    return [(g.index, g.names) for g in groups]


def test_a_cache_hit_resolves_nothing_and_every_change_of_the_parameter_set_resolves_again():
    net, selected, opt = make()
    calls = []
    binding = Binding(lambda: calls.append(1) or selected)
    assert layout(binding.groups(opt)) == [(0, ["0.weight"])]
    for _ in range(3):
        binding.groups(opt)
    assert binding.misses == len(calls) == 1
    opt.param_groups[0]["lr"] = 0.5  # a scheduler changes values, not the parameter set: still a hit
    assert binding.groups(opt) and binding.misses == 1
    opt.add_param_group({"params": [net[1].weight], "lr": 0.01})  # fine-tuning
    assert layout(binding.groups(opt)) == [(0, ["0.weight"]), (2, ["1.weight"])] and binding.misses == 2
    opt.load_state_dict(opt.state_dict())  # resume: new param-group dicts
    assert binding.groups(opt) and binding.misses == 3
    opt.param_groups[1]["params"].append(nn.Parameter(torch.zeros(1)))  # a list grown in place
    assert binding.groups(opt) and binding.misses == 4
    other = torch.optim.SGD(net.parameters(), lr=0.1)  # a second optimizer has its own entry
    assert layout(binding.groups(other)) == [(0, ["0.weight", "1.weight"])] and binding.misses == 5
    assert binding.groups(opt) and binding.misses == 5


def test_resolve_reports_the_live_group_positions():
    net, selected, opt = make()
    opt.load_state_dict(opt.state_dict())
    ((index, names, params),) = resolve(opt, selected)
    assert opt.param_groups[index]["lr"] == 0.1 and params[0] is net[0].weight


def test_a_lazy_parameter_is_resolved_once_it_materialises():
    net = nn.Sequential(nn.LazyLinear(2))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    binding = Binding(lambda: [(n, p) for n, p in net.named_parameters() if p.ndim >= 2])
    assert binding.groups(opt) == [] and binding.misses == 1
    net(torch.zeros(1, 3))
    assert layout(binding.groups(opt)) == [(0, ["0.weight"])] and binding.misses == 2
    binding.groups(opt)
    assert binding.misses == 2


def test_on_resolve_sees_each_resolution():
    net, selected, opt = make()
    seen = []
    binding = Binding(lambda: selected, on_resolve=lambda o, groups: seen.append((o, layout(groups))))
    binding.groups(opt)
    binding.groups(opt)
    assert seen == [(opt, [(0, ["0.weight"])])]
