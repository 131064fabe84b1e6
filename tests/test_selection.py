"""The default selection rule, include/exclude globs, wrapper names, and the errors for typos."""

import pytest
import torch
from torch import nn

from lightreg import select_parameters
from lightreg.model.selection import clean_name


class MyRMSNorm(nn.Module):
    """A custom norm layer: an ordinary module to the default rule, left out with ``exclude``."""

    def __init__(self, d):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1, d))  # 2-D on purpose: ndim alone must not select it


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.conv = nn.Conv2d(1, 2, 3)
        self.bn = nn.BatchNorm2d(2)
        self.fc = nn.Linear(4, 3)
        self.ln = nn.LayerNorm(3)
        self.rms = MyRMSNorm(3)
        self.head = nn.Linear(3, 2)
        self.frozen = nn.Linear(2, 2)
        self.frozen.requires_grad_(False)


def names(pairs):
    return [n for n, _ in pairs]


def test_default_rule_takes_matrices_outside_norm_layers_only():
    # Frozen parameters are selected (penalised once they train); a custom norm layer needs exclude.
    assert names(select_parameters(Net())) == [
        "embed.weight", "conv.weight", "fc.weight", "rms.scale", "head.weight", "frozen.weight"
    ]
    assert "rms.scale" not in names(select_parameters(Net(), exclude="rms.*"))


def test_include_replaces_the_rule_and_exclude_removes():
    net = Net()
    assert names(select_parameters(net, include=["fc.*", "head.bias"])) == ["fc.weight", "fc.bias", "head.bias"]
    assert names(select_parameters(net, exclude=["embed.*", "rms.*", "frozen.*"])) == [
        "conv.weight", "fc.weight", "head.weight"
    ]
    assert names(select_parameters(net, include="*.bias", exclude=["bn.*", "ln.*", "frozen.*"])) == [
        "conv.bias", "fc.bias", "head.bias"
    ]


def test_parameters_are_the_modules_own_objects_in_registration_order():
    net = Net()
    pairs = select_parameters(net)
    assert pairs[2][1] is net.fc.weight


def test_tied_parameters_appear_once():
    net = nn.Sequential(nn.Linear(3, 3, bias=False), nn.Linear(3, 3, bias=False))
    net[1].weight = net[0].weight
    assert names(select_parameters(net)) == ["0.weight"]


def test_wrapper_prefixes_are_stripped():
    assert clean_name("_orig_mod.fc.weight") == "fc.weight"
    assert clean_name("layers._fsdp_wrapped_module.0._checkpoint_wrapped_module.weight") == "layers.0.weight"
    assert clean_name("module.fc.weight") == "module.fc.weight"  # a user's own 'module' stays


def test_compiled_submodule_keeps_the_users_names():
    net = nn.Sequential()
    net.add_module("body", torch.compile(nn.Linear(3, 3)))
    assert names(select_parameters(net, include="body.*")) == ["body.weight", "body.bias"]


@pytest.mark.parametrize("kwargs, pattern", [({"include": ["fc.*", "fcc.*"]}, "fcc"), ({"exclude": "nope*"}, "nope")])
def test_a_pattern_matching_nothing_is_an_error_naming_it(kwargs, pattern):
    with pytest.raises(ValueError, match=f"pattern '{pattern}"):
        select_parameters(Net(), **kwargs)


def test_an_empty_selection_is_an_error():
    with pytest.raises(ValueError, match="selection is empty"):
        select_parameters(Net(), include="fc.*", exclude="fc.*")
    with pytest.raises(ValueError, match="selection is empty"):
        select_parameters(nn.Sequential(nn.LayerNorm(3)))


@pytest.mark.parametrize("bad", [3, [1], [""], {"fc.*"}.__iter__()])
def test_pattern_types_are_checked(bad):
    with pytest.raises(TypeError, match="include"):
        select_parameters(Net(), include=bad)


class SurfaceNormalHead(nn.Linear):
    """'Norm' in the name, not a normalisation layer."""


class EnormousProjection(nn.Linear):
    pass


def test_norm_layers_are_decided_by_type_not_by_class_name():
    from torch.nn.utils import parametrizations

    net = nn.ModuleDict({
        "surface": SurfaceNormalHead(3, 2), "enormous": EnormousProjection(3, 2),
        "ln": nn.LayerNorm((2, 3)), "rms": nn.RMSNorm((2, 3)), "bn": nn.BatchNorm2d(3),
        "gn": nn.GroupNorm(1, 3), "inorm": nn.InstanceNorm1d(3, affine=True),
        "wn": parametrizations.weight_norm(nn.Linear(3, 2)),
    })
    with pytest.warns(FutureWarning):
        net["old_wn"] = nn.utils.weight_norm(nn.Linear(3, 2))
    # 2-D norm scales (ln, rms) and weight-norm magnitudes g (shape (2, 1)) are left out by type
    assert names(select_parameters(net)) == [
        "surface.weight", "enormous.weight", "wn.parametrizations.weight.original1", "old_wn.weight_v"
    ]


def test_integer_parameters_are_never_selected_by_default():
    net = nn.Linear(3, 2)
    net.codes = nn.Parameter(torch.zeros(2, 2, dtype=torch.long), requires_grad=False)
    assert names(select_parameters(net)) == ["weight"]


def test_lazy_parameters_are_decided_once_materialised():
    net = nn.Sequential(nn.LazyLinear(2), nn.LayerNorm(2))
    assert select_parameters(net) == []  # not an error: the lazy weight may still be selected
    net(torch.zeros(1, 5))
    assert [(n, tuple(p.shape)) for n, p in select_parameters(net)] == [("0.weight", (2, 5))]
    with pytest.raises(ValueError, match="selection is empty"):
        select_parameters(nn.Sequential(nn.LazyLinear(2)), exclude="0.*")


def test_an_empty_include_is_refused():
    with pytest.raises(ValueError, match=r"include=\[\] selects no parameter"):
        select_parameters(Net(), include=[])
