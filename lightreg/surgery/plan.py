"""The architecture ``shrink`` can follow: weight layers of an ``nn.Sequential`` and what lies between them.

A network is read as its leaf modules in forward order (nested ``nn.Sequential``s are walked into).
Its weight layers (``Linear``, ``Conv2d``) are linked pairwise: unit ``j`` of a producer reaches the
consumer through a chain of per-unit modules (elementwise activations, dropout, eval-mode batch norm,
pooling, one ``Flatten``), so removing the unit removes row ``j`` of the producer, entry ``j`` of each
batch norm and input ``j`` of the consumer (a block of ``H*W`` columns after a ``Flatten``).
Anything else between two weight layers is refused by name: its forward cannot be followed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lightreg.base.distributed import is_dtensor

WEIGHTED = (nn.Linear, nn.Conv2d)
#: Per-entry maps: a constant unit stays constant (dropout: the identity at inference).
ELEMENTWISE = (
    nn.Identity, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Tanh,
    nn.Sigmoid, nn.Hardtanh, nn.Hardsigmoid, nn.Hardswish, nn.Softplus, nn.modules.dropout._DropoutNd,
)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
#: Spatial pooling per channel: a constant map pools to the same constant (average pooling: see ``keeps_constants``).
POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
SUPPORTED_LAYERS = "Linear, Conv2d, elementwise activations, Dropout, BatchNorm1d/2d (eval), MaxPool2d, AvgPool2d, " \
            "AdaptiveAvg/MaxPool2d, Flatten, nested nn.Sequential"

Named = tuple[str, nn.Module]


@dataclass
class Link:
    """Weight layer ``producer`` feeding weight layer ``consumer`` (indices into the layer list) via ``chain``."""

    producer: int
    consumer: int
    chain: list[Named]
    #: The consumer is a ``Conv2d`` padding with zeros: border outputs miss some taps of a constant map.
    zero_padded: bool


@dataclass
class Plan:
    """The weight layers in forward order, the links between them, and the modules before the first."""

    layers: list[Named]
    links: list[Link]
    prefix: list[Named]


def leaves(module: nn.Module, prefix: str = "") -> list[Named]:
    """``(path, module)`` of every module a forward pass runs, in order, walking into nested Sequentials."""
    out: list[Named] = []
    for key, child in module._modules.items():  # named_children() yields a module held twice only once
        if child is None:
            continue
        path = f"{prefix}{key}"
        if _is_plain_sequential(child):
            out += leaves(child, path + ".")
        else:
            out.append((path, child))
    return out


def _is_plain_sequential(module: nn.Module) -> bool:
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def make_plan(module: nn.Module) -> Plan:
    """Read ``module`` into a ``Plan``; ``TypeError``/``ValueError`` naming any module it cannot follow."""
    if not _is_plain_sequential(module):
        raise TypeError(
            f"shrink needs an nn.Sequential whose forward runs its children in order, got {type(module).__name__}; "
            "for a LightningModule pass its network (the app's models: model.net)"
        )
    named = leaves(module)
    _refuse_reuse(named)
    where = [i for i, (_, m) in enumerate(named) if isinstance(m, WEIGHTED)]
    if not where:
        raise ValueError(f"shrink found no Linear or Conv2d in the module; its leaves are {[p for p, _ in named]}")
    layers = [named[i] for i in where]
    for name, layer in layers:
        _check_layer(name, layer)
    links = [_link(layers, k, named[where[k] + 1:where[k + 1]]) for k in range(len(layers) - 1)]
    return Plan(layers, links, named[:where[0]])


def _refuse_reuse(named: list[Named]) -> None:
    first: dict[int, str] = {}
    for path, m in named:
        if any(True for _ in m.parameters()) and id(m) in first:
            raise ValueError(f"{path!r} is the same module as {first[id(m)]!r}: its weights serve two places, which "
                             "cannot be cut apart; give each place its own module")
        first.setdefault(id(m), path)


def _check_layer(name: str, layer: nn.Module) -> None:
    if is_dtensor(layer.weight):
        raise TypeError(f"{name!r}.weight is a sharded DTensor (FSDP2): shrink a full, unsharded copy of the model")
    if not isinstance(layer.weight, nn.Parameter):
        raise TypeError(f"{name!r}.weight is not a Parameter (torch.nn.utils.prune?): remove the reparametrisation first")
    if isinstance(layer, nn.Conv2d) and layer.groups != 1:
        raise ValueError(f"shrink cannot cut channels of {name!r}: Conv2d with groups={layer.groups} (only groups=1)")


def _check_norm(name: str, norm: nn.Module, units: int, spatial: bool) -> None:
    if norm.training:
        raise ValueError(f"{name!r} ({type(norm).__name__}) is in training mode: its output depends on the batch; "
                         "call .eval() before shrink")
    if norm.running_mean is None:
        raise ValueError(f"{name!r} ({type(norm).__name__}) has track_running_stats=False: it normalises by the batch")
    if isinstance(norm, nn.BatchNorm2d) != spatial:
        raise ValueError(f"{name!r} ({type(norm).__name__}) does not match the {'map' if spatial else 'flat'} tensor here")
    if norm.num_features != units:
        raise ValueError(f"{name!r} has num_features={norm.num_features}, but {units} units reach it")


def _link(layers: list[Named], k: int, chain: list[Named]) -> Link:
    (p_name, producer), (c_name, consumer) = layers[k], layers[k + 1]
    units = producer.weight.shape[0]
    spatial = isinstance(producer, nn.Conv2d)  # (N, C, H, W) until a Flatten
    flattened = False
    for name, m in chain:
        if isinstance(m, nn.Flatten):
            if (m.start_dim, m.end_dim) != (1, -1):
                raise ValueError(f"{name!r}: shrink follows only Flatten(start_dim=1, end_dim=-1), got {m}")
            flattened, spatial = flattened or spatial, False
        elif flattened and not isinstance(m, ELEMENTWISE):
            raise TypeError(f"{name!r} ({type(m).__name__}) between a Flatten and {c_name!r}: only elementwise "
                            "modules are followed there")
        elif isinstance(m, NORMS):
            _check_norm(name, m, units, spatial)
        elif isinstance(m, POOLS):
            if not spatial:
                raise ValueError(f"{name!r} ({type(m).__name__}) pools a feature map, but {p_name!r} outputs a flat tensor")
        elif not isinstance(m, ELEMENTWISE):
            raise TypeError(f"shrink cannot follow {name!r} ({type(m).__name__}) between {p_name!r} and {c_name!r}; "
                            f"it follows {SUPPORTED_LAYERS}")
    if isinstance(consumer, nn.Conv2d):
        if not spatial or consumer.in_channels != units:
            raise ValueError(f"{c_name!r} (Conv2d, in_channels={consumer.in_channels}) does not take the {units} "
                             f"channel map of {p_name!r}")
    elif spatial:
        raise ValueError(f"{c_name!r} (Linear) acts on the last axis of {p_name!r}'s feature map: put a Flatten between")
    elif consumer.in_features % units or (not flattened and consumer.in_features != units):
        raise ValueError(f"{c_name!r} (Linear, in_features={consumer.in_features}) does not take the {units} "
                         f"units of {p_name!r}")
    return Link(k, k + 1, chain, isinstance(consumer, nn.Conv2d) and pads_with_zeros(consumer))


def pads_with_zeros(conv: nn.Conv2d) -> bool:
    """Whether ``conv`` reads zeros beyond the border (``padding_mode='zeros'`` with a padding > 0).

    Example:
        >>> pads_with_zeros(nn.Conv2d(1, 1, 3, padding=1)), pads_with_zeros(nn.Conv2d(1, 1, 3, padding=1, padding_mode="replicate"))
        (True, False)
    """
    if conv.padding_mode != "zeros":
        return False
    if isinstance(conv.padding, str):
        return conv.padding == "same" and any(k > 1 for k in conv.kernel_size)
    return any(p > 0 for p in conv.padding)


def keeps_constants(pool: nn.Module) -> bool:
    """Whether ``pool`` maps every constant map to the same constant (an ``AvgPool2d`` that averages padded
    zeros in, or divides by a fixed ``divisor_override``, does not)."""
    if not isinstance(pool, nn.AvgPool2d):
        return True
    padding = pool.padding if isinstance(pool.padding, tuple) else (pool.padding,)
    return pool.divisor_override is None and (not pool.count_include_pad or not any(padding))


@torch.no_grad()
def chain_constants(chain: list[Named], bias: Tensor) -> tuple[Tensor, Tensor]:
    """``(k, constant)``: the value ``chain(b_j)`` that a unit with a zero incoming row delivers to the consumer,
    and whether it is still one constant over the whole map there (average pooling over padded zeros breaks
    that for ``k != 0``).

    Example:
        >>> chain_constants([("1", nn.ReLU()), ("2", nn.Sigmoid())], torch.tensor([-1.0, 2.0]))[0]
        tensor([0.5000, 0.8808])
    """
    k, constant = bias.clone(), torch.ones_like(bias, dtype=torch.bool)
    for _, m in chain:
        if isinstance(m, POOLS):
            if not keeps_constants(m):
                constant &= k == 0
        elif isinstance(m, nn.BatchNorm2d):
            k = m(k.view(1, -1, 1, 1)).view(-1)
        elif isinstance(m, nn.BatchNorm1d):
            k = m(k.view(1, -1)).view(-1)
        elif not isinstance(m, (nn.Flatten, nn.modules.dropout._DropoutNd)):  # dropout: the identity at inference
            k = m(k)
    return k, constant


def slice_norm(norm: nn.Module, keep: Tensor) -> None:
    """Keep the entries ``keep`` of a batch norm's affine parameters and running statistics."""
    for name in ("weight", "bias"):
        if getattr(norm, name) is not None:
            set_parameter(norm, name, getattr(norm, name).detach()[keep])
    norm.running_mean = norm.running_mean[keep]
    norm.running_var = norm.running_var[keep]
    norm.num_features = int(keep.sum())


def set_parameter(module: nn.Module, name: str, value: Tensor) -> None:
    """Replace (or create) ``module.<name>`` by a new ``Parameter`` holding a copy of ``value``."""
    old = getattr(module, name)
    setattr(module, name, nn.Parameter(value.clone(), requires_grad=old.requires_grad if old is not None else True))
