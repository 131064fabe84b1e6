"""Coupled channel groups: the parameter slices that make one removable channel, from Torch-Pruning's graph.

A channel of a real network is not one row of one tensor. Conv ``c`` of a ResNet block writes channel ``j``
with filter ``W[j]``; its BatchNorm scales and shifts it (``gamma_j``, ``beta_j``); the next convs read it
through their input slices ``W'[:, j]``; a residual add ties it to channel ``j`` of every other tensor that
adds into the same stream. Torch-Pruning's dependency graph (``tp.DependencyGraph``, DepGraph, CVPR 2023)
traces a forward pass and returns these sets as groups of ``(dependency, indices)``; this module turns each
group into :class:`Family`: per parameter, the dimension and the indices along it, and for each index the
*unit* it belongs to (a channel; a whole attention head for the query/key/value layers of a module that has
``attention_head_size``, Hugging Face style). With every slice of a unit at zero, the unit's output is zero
*and* nothing reads it, so ``shrink`` removes it with no change of output.

Only groups whose removal is exact are kept: a group that reaches a ``LayerNorm``/``GroupNorm`` (they
normalise across channels, so a zero channel still counts), an ``nn.MultiheadAttention`` embedding (its head
count ties its widths), an embedding table, an LSTM, a raw parameter, a grouped (not depthwise) conv's input,
or the model's output is left out, and the reason kept in :attr:`CoupledGroups.skipped`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightreg.base.distributed import is_dtensor
from lightreg.model.selection import clean_name


@dataclass
class Slice:
    """Entries ``param.index_select(dim, index)`` of one parameter; row ``k`` belongs to unit ``unit[k]``."""

    name: str
    param: Tensor
    dim: int
    index: Tensor
    unit: Tensor


@dataclass
class Family:
    """One dependency group of the graph: ``units`` removable units, made of ``slices``.

    ``sizes[u]`` is ``|g|``, the number of entries of unit ``u`` over all its slices.
    """

    name: str
    units: int
    slices: list[Slice]
    root: Tensor | None = None  # the weight of the layer whose output channels the group is rooted at
    root_module: Any = None  # that layer, and Torch-Pruning's handler of the root, for the surgery
    root_handler: Any = None
    head: int = 0  # units are attention heads of this many root channels (0: one channel each)
    sizes: Tensor = field(default_factory=lambda: torch.zeros(0))

    def __post_init__(self) -> None:
        sizes = torch.zeros(self.units, dtype=torch.float64)
        for s in self.slices:
            per_row = s.param.numel() // max(s.param.shape[s.dim], 1)
            sizes.index_add_(0, s.unit, torch.full((len(s.unit),), float(per_row), dtype=torch.float64))
        self.sizes = sizes

    @property
    def params(self) -> list[Tensor]:
        seen: dict[int, Tensor] = {}
        for s in self.slices:
            seen.setdefault(id(s.param), s.param)
        return list(seen.values())

    def squared_norms(self) -> Tensor:
        """``||w_g||²`` per unit, accumulated in float32 at least (float64 for float64 weights)."""
        dtype = torch.float64 if self.slices[0].param.dtype == torch.float64 else torch.float32
        out = torch.zeros(self.units, dtype=dtype, device=self.slices[0].param.device)
        for s in self.slices:
            rows = s.param.detach().index_select(s.dim, s.index).movedim(s.dim, 0).reshape(len(s.index), -1)
            out.index_add_(0, s.unit, rows.to(dtype).square().sum(1))
        return out

    def alive(self) -> Tensor:
        """Which units have any nonzero entry."""
        return self.squared_norms() > 0


@dataclass
class CoupledGroups:
    """The families of a traced model, and the groups left out (``(group root, reason)``)."""

    families: list[Family]
    skipped: list[tuple[str, str]]

    @property
    def params(self) -> list[Tensor]:
        seen: dict[int, Tensor] = {}
        for f in self.families:
            for p in f.params:
                seen.setdefault(id(p), p)
        return list(seen.values())


def import_tp() -> Any:
    try:
        import torch_pruning as tp
    except ImportError as e:  # an optional dependency: say which extra brings it
        raise ImportError("coupled groups and shrink(module, example_inputs=...) need Torch-Pruning: "
                          "pip install 'lightreg[prune]' (torch-pruning>=1.5)") from e
    return tp


def as_inputs(module: nn.Module, example_inputs: Any) -> Any:
    """``example_inputs``, or the module's ``example_input_array`` (a LightningModule's), on the module's device."""
    if example_inputs is None:
        example_inputs = getattr(module, "example_input_array", None)
        if example_inputs is None:
            raise ValueError(f"example_inputs is None and {type(module).__name__} has no example_input_array: the "
                             "dependency graph needs an input to trace")
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    return _to(example_inputs, device)


def _to(x: Any, device: torch.device) -> Any:
    if isinstance(x, Tensor):
        return x.to(device)
    if isinstance(x, Mapping):
        return {k: _to(v, device) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_to(v, device) for v in x)
    return x


def trace_graph(module: nn.Module, example_inputs: Any) -> Any:
    """Torch-Pruning's dependency graph of ``module``, traced in eval mode (no batch-norm statistics move)."""
    tp = import_tp()
    for name, p in module.named_parameters():
        if is_dtensor(p):
            raise TypeError(f"{name!r} is a sharded DTensor (FSDP2): coupled groups need the full, unsharded model")
    inputs = as_inputs(module, example_inputs)
    was_training = module.training
    module.eval()
    try:
        with torch.enable_grad():  # the graph is read from autograd's grad_fn chain
            return tp.DependencyGraph().build_dependency(module, example_inputs=inputs)
    finally:
        module.train(was_training)


def coupled_groups(module: nn.Module, example_inputs: Any = None, graph: Any = None) -> CoupledGroups:
    """The exactly removable channel groups of ``module`` (see the module docstring).

    Args:
        module: any model Torch-Pruning's graph can trace.
        example_inputs: a tensor, tuple or dict of inputs; default: ``module.example_input_array``.
        graph: a dependency graph already traced from ``module`` (skips the trace).

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(16, 2))
        >>> groups = coupled_groups(net, torch.zeros(1, 1, 4, 4))
        >>> [(f.name, f.units, sorted({s.name for s in f.slices})) for f in groups.families]
        [('0', 4, ['0.bias', '0.weight', '1.bias', '1.weight', '4.weight'])]
        >>> groups.families[0].sizes.tolist()  # 9 + 1 (conv) + 2 (norm) + 8 (the linear's 2 x 4 block of columns)
        [20.0, 20.0, 20.0, 20.0]
    """
    tp = import_tp()
    graph = trace_graph(module, example_inputs) if graph is None else graph
    names = {id(p): clean_name(n) for n, p in module.named_parameters()}
    module_names = {id(m): n for n, m in module.named_modules()}
    heads = _head_sizes(module)
    families, skipped = [], []
    roots = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.LSTM, nn.MultiheadAttention)
    for group in graph.get_all_groups(root_module_types=roots):
        root = module_names.get(id(group[0].dep.target.module), "?")
        reason = _refusal(tp, graph, group)
        if reason:
            skipped.append((root, reason))
            continue
        family = _family(tp, group, root, names, heads)
        if family is not None:
            families.append(family)
    return CoupledGroups(families, skipped)


def _head_sizes(module: nn.Module) -> dict[int, int]:
    """``id(linear) -> head size`` for the Linear children of attention modules that say their head size."""
    out: dict[int, int] = {}
    for m in module.modules():
        size = getattr(m, "attention_head_size", None)
        if isinstance(size, int) and size > 0:
            for child in m.children():
                if isinstance(child, nn.Linear):
                    out[id(child)] = size
    return out


def _refusal(tp: Any, graph: Any, group: Any) -> str:
    fn = tp.pruner.function
    for item in group:
        target, handler = item.dep.target.module, item.dep.handler
        node = graph.module2node.get(target)
        if isinstance(target, (nn.LayerNorm, nn.GroupNorm)) or getattr(target, "normalized_shape", None) is not None:
            return f"reaches {type(target).__name__}, which normalises across channels: a zero channel still counts"
        if isinstance(target, nn.MultiheadAttention):
            return "an nn.MultiheadAttention embedding: its num_heads ties every width"
        if isinstance(target, (nn.Embedding, nn.LSTM, nn.Parameter)) or isinstance(target, Tensor):
            return f"reaches {type(target).__name__}"
        if handler == fn.prune_conv_in_channels and target.groups > 1 and target.groups != target.in_channels:
            return f"input of a grouped conv (groups={target.groups})"
        if graph.is_out_channel_pruning_fn(handler) and node is not None and not node.outputs and _has_weight(target):
            return "the model's output"
    return ""


def _has_weight(m: Any) -> bool:
    return isinstance(m, nn.Module) and any(True for _ in m.parameters(recurse=False))


def _family(tp: Any, group: Any, root: str, names: dict[int, str], heads: dict[int, int]) -> Family | None:
    fn = tp.pruner.function
    rows: dict[tuple[int, int], tuple[Tensor, int, dict[int, int]]] = {}  # (param, dim) -> index -> root index
    head = 0
    for item in group:
        m, handler = item.dep.target.module, item.dep.handler
        if not _has_weight(m):
            continue
        head = head or heads.get(id(m), 0)
        for param, dim in _slices(fn, m, handler):
            entry = rows.setdefault((id(param), dim), (param, dim, {}))
            entry[2].update(zip(_plain(item.idxs), _plain(item.root_idxs), strict=True))
    if not rows:
        return None
    units_of = (lambda r: r // head) if head else (lambda r: r)
    slices = []
    for param, dim, mapping in rows.values():
        index = torch.tensor(sorted(mapping), dtype=torch.long, device=param.device)
        unit = torch.tensor([units_of(mapping[i]) for i in sorted(mapping)], dtype=torch.long, device=param.device)
        slices.append(Slice(names[id(param)], param, dim, index, unit))
    units = int(max(int(s.unit.max()) for s in slices)) + 1
    root_module = group[0].dep.target.module
    return Family(root, units, slices, getattr(root_module, "weight", None), root_module, group[0].dep.handler, head)


def _plain(idxs: Any) -> list[int]:
    return [int(getattr(i, "idx", i)) for i in idxs]


def _slices(fn: Any, m: nn.Module, handler: Any) -> list[tuple[Tensor, int]]:
    """The ``(parameter, dim)`` pairs of ``m`` that ``handler`` cuts along."""
    bias = [(m.bias, 0)] if getattr(m, "bias", None) is not None else []
    transposed = getattr(m, "transposed", False)
    if handler in (fn.prune_conv_out_channels, fn.prune_depthwise_conv_out_channels,
                   fn.prune_depthwise_conv_in_channels):
        return [(m.weight, 1 if transposed and handler == fn.prune_conv_out_channels else 0)] + bias
    if handler == fn.prune_conv_in_channels:
        return [(m.weight, 0 if transposed else 1)] if m.groups == 1 else [(m.weight, 0)] + bias  # depthwise
    if handler == fn.prune_linear_out_channels:
        return [(m.weight, 0)] + bias
    if handler == fn.prune_linear_in_channels:
        return [(m.weight, 1)]
    if handler in (fn.prune_batchnorm_out_channels, fn.prune_batchnorm_in_channels,
                   fn.prune_instancenorm_out_channels, fn.prune_instancenorm_in_channels):
        return [(m.weight, 0)] + bias if getattr(m, "weight", None) is not None else []
    if handler == fn.prune_prelu_out_channels:
        return [(m.weight, 0)] if m.weight.numel() > 1 else []
    raise TypeError(f"coupled groups cannot follow {type(m).__name__} (Torch-Pruning handler {handler}); "
                    "exclude it from the trace or shrink by hand")
