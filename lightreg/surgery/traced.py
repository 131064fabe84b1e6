"""``shrink(module, example_inputs=...)``: cut dead coupled channel groups out of any traced model.

The model is traced by Torch-Pruning's dependency graph into coupled groups (``lightreg.model.dependency_groups``).
A unit (channel or attention head) goes when

* every slice of its group is exactly zero (what ``CoupledGroupLasso`` produces): nothing writes it and
  nothing reads it, so removing it changes no output; or
* its producers' weight rows are zero (plain ``GroupLasso(dim=0)``): the channel carries a constant, measured
  at each reading layer on the example input. That constant is folded into the reader's bias,
  ``b += c * Σ_taps W[:, j]``, where this is exact: a ``Linear``, or a conv that does not pad with zeros.
  A constant 0 is cut anywhere. Otherwise the unit is kept and counted as ``kept`` in the report.

The surgery is Torch-Pruning's (``DependencyGraph.get_pruning_group(...).prune()``), which also slices batch
norms' running statistics; attention modules with ``attention_head_size`` (Hugging Face) get their head
counts updated. The result is checked on the example input against the original before it is returned.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from lightreg.model.dependency_groups import Family, as_inputs, coupled_groups, import_tp, trace_graph
from lightreg.surgery.cost import call, forward_time, layer_costs, tensors_of
from lightreg.surgery.traced_report import TracedShrinkReport, TracedShrinkRow


def shrink_traced(module: nn.Module, example_inputs: Any = None, rtol: float = 1e-5, time_it: bool = True) -> nn.Module:
    """A smaller deep copy of ``module`` without its dead coupled groups; same outputs in eval mode.

    Args:
        module: any model Torch-Pruning's graph traces (kept unchanged).
        example_inputs: a tensor, tuple or dict; default: ``module.example_input_array``.
        rtol: the largest output change allowed, relative to the output's largest magnitude; over it,
            ``RuntimeError`` (the graph missed something).
        time_it: measure the forward time before and after (median of 10 passes).

    Returns:
        The new module, with a :class:`TracedShrinkReport` as its ``shrink_report`` attribute.
    """
    import_tp()
    inputs = as_inputs(module, example_inputs)
    was_training = module.training
    small = copy.deepcopy(module).eval()
    reference = copy.deepcopy(module).eval()
    with torch.no_grad():
        expected = [t.clone() for t in tensors_of(call(reference, inputs))]
    costs_before = layer_costs(reference, inputs)
    graph = trace_graph(small, inputs)
    groups = coupled_groups(small, graph=graph)
    with torch.no_grad():
        kept = {f.name: _fold_constants(small, f, inputs) for f in groups.families}
        dead = [(f, _dead_units(f)) for f in groups.families]
    removed: dict[str, int] = {}
    for family, units in dead:
        if units:
            roots = [r for r in range(family.units * max(family.head, 1)) if (r // family.head if family.head else r) in units]
            graph.get_pruning_group(family.root_module, family.root_handler, roots).prune()
            removed[family.name] = len(units)
    _update_heads(small)
    _retie(small, _tied(module))
    with torch.no_grad():
        got = list(tensors_of(call(small, inputs)))
    diff = _check_outputs(expected, got, rtol)
    costs_after = layer_costs(small, inputs)
    rows = tuple(
        TracedShrinkRow(name, type(dict(reference.named_modules())[name]).__name__, *costs_before[name],
                        *costs_after.get(name, (0, 0)), removed.get(name, 0), kept.get(name, 0))
        for name in costs_before
    )
    times = (forward_time(reference, inputs), forward_time(small, inputs)) if time_it else (float("nan"), float("nan"))
    small.shrink_report = TracedShrinkReport(
        rows, _count(module), _count(small), *times, diff, tuple(groups.skipped))
    small.train(was_training)
    return small


def _tied(module: nn.Module) -> list[list[str]]:
    """The names of each parameter that several modules hold (tied weights: an embedding and its output head)."""
    names: dict[int, list[str]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return [n for n in names.values() if len(n) > 1]


def _retie(small: nn.Module, tied: list[list[str]]) -> None:
    """Tie again in ``small`` the weights tied in the original: the cut must have left them equal (it did not cut
    them, or cut them alike), else ``ValueError`` naming them (the graph cuts each holder on its own)."""
    for names in tied:
        first = small.get_parameter(names[0])
        for name in names[1:]:
            other = small.get_parameter(name)
            if other is first:
                continue
            if other.shape != first.shape or not torch.equal(other, first):
                raise ValueError(f"shrink cannot cut a weight tied between {' and '.join(names)}: the cut would give "
                                 f"them shapes {tuple(first.shape)} and {tuple(other.shape)} (or different values); "
                                 "untie them, or exclude them from the penalty")
            owner, _, attr = name.rpartition(".")
            setattr(small.get_submodule(owner), attr, first)


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _dead_units(family: Family) -> list[int]:
    """The all-zero units; of a group that died whole, one stays (zero in and out) so that the shapes stay valid."""
    dead = [int(u) for u in (~family.alive()).nonzero().flatten()]
    return dead[1:] if len(dead) == family.units else dead


def _producers_zero(family: Family) -> Tensor:
    """Per unit: whether every weight that writes the channel (conv/linear output rows) is zero."""
    zero = torch.ones(family.units, dtype=torch.bool, device=family.slices[0].param.device)
    for s in family.slices:
        if s.name.endswith("weight") and s.dim == 0 and s.param.ndim >= 2:
            rows = s.param.index_select(0, s.index).reshape(len(s.index), -1)
            alive = (rows != 0).any(1)
            zero &= torch.zeros(family.units, dtype=torch.long, device=zero.device).index_add_(0, s.unit, alive.long()) == 0
    return zero


def _readers(module: nn.Module, family: Family) -> list[tuple[nn.Module, Any]]:
    """``(layer, slice)`` of the conv/linear layers that read the family's channels (their dim-1 slices)."""
    owner = {id(p): m for m in module.modules() for p in m.parameters(recurse=False)}
    return [(owner[id(s.param)], s) for s in family.slices
            if s.dim == 1 and s.param.ndim >= 2 and getattr(owner[id(s.param)], "groups", 1) == 1]


def _fold_constants(module: nn.Module, family: Family, inputs: Any) -> int:
    """Fold the constant channels of ``family`` into their readers where exact, then zero their slices.

    Returns the count of constant units that stay (their fold would not be exact)."""
    candidates = _producers_zero(family) & family.alive()
    if not candidates.any():
        return 0
    readers = _readers(module, family)
    seen: dict[int, Tensor] = {}
    handles = [m.register_forward_pre_hook(lambda m, args, i=i: seen.__setitem__(i, args[0].detach()))
               for i, (m, _) in enumerate(readers)]
    try:
        call(module, inputs)
    finally:
        for h in handles:
            h.remove()
    exact = candidates.clone()
    folds = []
    for i, (m, s) in enumerate(readers):
        x = seen.get(i)
        if x is None:
            exact[:] = False
            break
        value, constant = _channel_constants(m, x, s)
        padded = isinstance(m, nn.modules.conv._ConvNd) and any(p != 0 for p in m.padding) and m.padding_mode == "zeros"
        ok = constant & ((value == 0) | (not padded))
        exact &= torch.zeros(family.units, dtype=torch.long, device=exact.device).index_add_(0, s.unit, (~ok).long()) == 0
        folds.append((m, s, value))
    for m, s, value in folds:
        fold_rows = exact[s.unit]
        if not fold_rows.any():
            continue
        w = m.weight.index_select(1, s.index[fold_rows])  # (out, k, *kernel)
        k = value[fold_rows].to(w.dtype).view(1, -1, *[1] * (w.ndim - 2))
        shift = (w * k).sum(dim=tuple(range(1, w.ndim)))
        if m.bias is None:
            m.bias = nn.Parameter(torch.zeros(m.weight.shape[0], dtype=m.weight.dtype, device=m.weight.device))
        m.bias.add_(shift)
    for s in family.slices:  # the folded units: now nothing writes or reads them
        rows = exact[s.unit]
        if rows.any():
            s.param.index_fill_(s.dim, s.index[rows], 0.0)
    return int((candidates & ~exact).sum())


def _channel_constants(m: nn.Module, x: Tensor, s: Any) -> tuple[Tensor, Tensor]:
    """For each index of slice ``s``: the value of that input channel of ``m`` and whether it is constant."""
    if isinstance(m, nn.Linear) and x.shape[-1] != m.in_features:
        return torch.zeros(len(s.index)), torch.zeros(len(s.index), dtype=torch.bool)
    channels = x.movedim(1 if isinstance(m, nn.modules.conv._ConvNd) else -1, 0).reshape(x.shape[1 if isinstance(m, nn.modules.conv._ConvNd) else -1], -1)
    picked = channels.index_select(0, s.index.to(x.device))
    first = picked[:, :1]
    return first.flatten(), (picked == first).all(1)


def _update_heads(module: nn.Module) -> None:
    """Hugging Face attention modules: head counts follow their query layer's width after head pruning."""
    for m in module.modules():
        size, query = getattr(m, "attention_head_size", None), getattr(m, "query", None)
        if isinstance(size, int) and isinstance(query, nn.Linear) and hasattr(m, "num_attention_heads"):
            m.num_attention_heads = query.out_features // size
            if hasattr(m, "all_head_size"):
                m.all_head_size = m.num_attention_heads * size


def _check_outputs(expected: list[Tensor], got: list[Tensor], rtol: float) -> float:
    if len(expected) != len(got) or any(a.shape != b.shape for a, b in zip(expected, got, strict=True)):
        raise RuntimeError("shrink changed the shape of the model's outputs: a cut group reached the output")
    diff, scale = 0.0, 0.0
    for a, b in zip(expected, got, strict=True):
        if a.numel():
            diff = max(diff, float((a - b).abs().max()))
            scale = max(scale, float(a.abs().max()))
    if diff > rtol * max(scale, 1e-30):
        raise RuntimeError(f"shrink changed the outputs by {diff:.3g} (largest output {scale:.3g}, rtol={rtol}): the "
                           "graph missed a dependency; the model is left as it was")
    return diff
