"""``shrink``: cut a network's dead units out into a smaller dense copy with the same outputs.

Structured zeros (group lasso rows, filters, columns) cost as much as any other weight at inference; cut
out, they cost nothing. Between two weight layers ``P -> chain -> C`` (``lightreg.surgery.plan``), unit
``j`` of ``P`` goes when

* its outgoing weights ``C[:, j]`` are all zero: it contributes nothing; or
* its incoming row ``P[j]`` is all zero: it outputs the constant ``b_j``, which reaches ``C`` as
  ``k_j = chain(b_j)``. It is folded into ``C``'s bias, ``b_C += k_j * Σ_taps C[:, j]``: exact through a
  ``Linear`` (after a ``Flatten``: over the unit's ``H*W`` block), and through a ``Conv2d`` that does not
  pad with zeros. A zero-padding conv sees fewer taps at the border, so there only ``k_j = 0`` (e.g.
  ``relu`` of a negative bias) is cut; other constant units stay and the report counts them.

Each cut can expose more (a row whose only non-zeros fed cut units), so the cuts repeat to a fixed point.
A layer whose every unit goes keeps one unit with zero weights in and out: the shapes stay valid and the
model's output, now independent of its input, is still exact; the report marks the layer ``collapsed``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightreg.surgery.plan import Link, Plan, chain_constants, make_plan, set_parameter, slice_norm
from lightreg.surgery.inputs import InputCut
from lightreg.surgery.report import ShrinkReport, ShrinkRow


@dataclass
class _Layer:
    """A weight layer's working copy: cut units' rows and cut inputs' columns are zeroed as they go."""

    name: str
    module: nn.Module
    weight: Tensor
    bias: Tensor
    has_bias: bool
    alive: Tensor
    folded: Tensor  # removed, its constant folded forward
    unused: Tensor  # removed, its outgoing weights were zero
    collapsed: bool = False

    @classmethod
    def of(cls, name: str, module: nn.Module) -> _Layer:
        w = module.weight.detach().clone()
        b = module.bias.detach().clone() if module.bias is not None else w.new_zeros(w.shape[0])
        none = torch.zeros(w.shape[0], dtype=torch.bool, device=w.device)
        return cls(name, module, w, b, module.bias is not None, ~none, none.clone(), none.clone())

    @property
    def rows(self) -> Tensor:
        return self.weight.view(self.weight.shape[0], -1)

    def columns(self, units: int) -> Tensor:
        """``(out, units, taps)``: the weights each input unit feeds (taps: a kernel, or a flattened map)."""
        return self.weight.view(self.weight.shape[0], units, -1)


def shrink(module: nn.Module, example_inputs: Any = None, *, drop_inputs: bool = False) -> nn.Module:
    """A smaller deep copy of ``module`` without its dead units, computing the same outputs (in eval mode).

    With ``example_inputs`` (or for a module with an ``example_input_array``, e.g. a LightningModule), any
    model Torch-Pruning's dependency graph traces: dead coupled channel groups are cut
    (``lightreg.surgery.traced``; needs ``lightreg[prune]``), and the report is a ``TracedShrinkReport``.

    Otherwise ``module`` is an ``nn.Sequential`` of ``Linear``/``Conv2d`` layers with elementwise activations,
    dropout, eval-mode ``BatchNorm1d/2d``, pooling and ``Flatten`` between them (``lightreg.surgery.plan``);
    for the app's models pass ``model.net``. The original is left untouched. The output layer keeps its
    width; modules before the first and after the last weight layer are copied as they are.

    Args:
        module: the network.
        example_inputs: an input to trace ``module`` with (a tensor, tuple, or dict of keyword arguments).
        drop_inputs: also cut the inputs the first layer never reads (all-zero columns / input channels).
            The result then takes ``x[:, report.kept_inputs]`` instead of ``x``.

    Returns:
        The new module, with a ``ShrinkReport`` as its ``shrink_report`` attribute (``lightreg.shrink_report``).

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double()
        >>> with torch.no_grad():
        ...     net[0].weight[1:3] = 0.0   # units 1 and 2 output relu(bias): constants
        ...     net[2].weight[:, 3] = 0.0  # unit 3 is never read
        >>> small = shrink(net)
        >>> small[0].weight.shape, small[2].weight.shape
        (torch.Size([1, 3]), torch.Size([2, 1]))
        >>> x = torch.randn(5, 3, dtype=torch.float64)
        >>> torch.allclose(small(x), net(x), atol=1e-12, rtol=0)
        True
    """
    if not isinstance(drop_inputs, bool):
        raise TypeError(f"drop_inputs must be a bool, got {drop_inputs!r}")
    if example_inputs is not None or (getattr(module, "example_input_array", None) is not None and not drop_inputs):
        if drop_inputs:
            raise ValueError("drop_inputs=True applies to an nn.Sequential shrunk without example_inputs")
        from lightreg.surgery.traced import shrink_traced

        return shrink_traced(module, example_inputs)
    plan = make_plan(module)  # fail on the original, before any copy
    if drop_inputs:
        InputCut.of(plan)
    small = copy.deepcopy(module)
    plan = make_plan(small)
    inputs = InputCut.of(plan) if drop_inputs else None
    layers = [_Layer.of(name, m) for name, m in plan.layers]
    before = [_param_count(layer.module) for layer in layers]
    widths = [(_in_units(layer), layer.weight.shape[0]) for layer in layers]
    with torch.no_grad():
        while any([_cut_link(link, layers) for link in plan.links] + [inputs.cut(layers[0]) if inputs else False]):
            pass
        kept = [_kept_constant(link, layers) for link in plan.links] + [0]
        _rebuild(plan, layers, inputs)
    rows = [
        ShrinkRow(layer.name, type(layer.module).__name__, units, int(layer.alive.sum()), n_in, _in_units(layer),
                  before[i], _param_count(layer.module), int(layer.folded.sum()), int(layer.unused.sum()), kept[i],
                  layer.collapsed, _note(plan, i, kept[i]))
        for i, (layer, (n_in, units)) in enumerate(zip(layers, widths, strict=True))
    ]
    small.shrink_report = ShrinkReport(
        tuple(rows), _count(module), _count(small), inputs.kept_inputs() if inputs else None,
        inputs.flat_alive().numel() if inputs else None,
    )
    return small


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _param_count(module: nn.Module) -> int:
    return module.weight.numel() + (module.bias.numel() if module.bias is not None else 0)


def _in_units(layer: _Layer) -> int:
    m = layer.module
    return m.in_channels if isinstance(m, nn.Conv2d) else m.in_features


def _cut_link(link: Link, layers: list[_Layer]) -> bool:
    """One pass over the units of ``link``'s producer; whether any unit was cut."""
    p, c = layers[link.producer], layers[link.consumer]
    cols = c.columns(p.weight.shape[0])
    dead_in = p.alive & ~(p.rows != 0).any(1)
    dead_out = p.alive & ~(cols != 0).any(2).any(0)
    k, constant = chain_constants(link.chain, p.bias)
    remove = dead_out | (dead_in & constant & ((k == 0) | (not link.zero_padded)))
    n_alive = int(p.alive.sum())
    fold = remove & ~dead_out & (k != 0)
    if fold.any():
        c.bias += cols.sum(2) @ torch.where(fold, k, torch.zeros_like(k))
        c.has_bias = True
    cols[:, remove] = 0.0
    p.rows[remove] = 0.0
    p.bias[remove] = 0.0
    p.folded |= remove & ~dead_out
    p.unused |= dead_out
    p.alive &= ~remove
    if not p.alive.any():  # keep one unit, zero in and out: it carries nothing, the shapes stay valid
        j = int(remove.nonzero()[0])
        p.alive[j], p.folded[j], p.unused[j], p.collapsed = True, False, False, True
    return int(p.alive.sum()) != n_alive


def _kept_constant(link: Link, layers: list[_Layer]) -> int:
    """Units with a zero incoming row still there at the fixed point: their fold would not be exact."""
    p = layers[link.producer]
    return int((p.alive & ~(p.rows != 0).any(1)).sum()) - int(p.collapsed)


def _note(plan: Plan, i: int, kept: int) -> str:
    if not kept:
        return ""
    consumer = plan.layers[plan.links[i].consumer][0]
    return (f"{kept} constant unit(s) kept: zero padding in {consumer!r} (or average pooling over it) "
            "would make the fold inexact")


def _rebuild(plan: Plan, layers: list[_Layer], inputs: InputCut | None) -> None:
    """Write the cut weights into the copy's modules (and slice the batch norms between them)."""
    for i, layer in enumerate(layers):
        keep_in = layers[i - 1].alive if i else (inputs.alive if inputs else None)
        w = layer.columns(layers[i - 1].weight.shape[0] if i else _in_units(layer))[layer.alive]
        if keep_in is not None:
            w = w[:, keep_in]
        m = layer.module
        if isinstance(m, nn.Conv2d):
            w = w.reshape(w.shape[0], w.shape[1], *m.kernel_size)
            m.out_channels, m.in_channels = w.shape[0], w.shape[1]
        else:
            w = w.reshape(w.shape[0], -1)
            m.out_features, m.in_features = w.shape
        set_parameter(m, "weight", w)
        if layer.has_bias:
            set_parameter(m, "bias", layer.bias[layer.alive])
    for link in plan.links:
        for _, norm in link.chain:
            if isinstance(norm, nn.modules.batchnorm._BatchNorm):
                slice_norm(norm, layers[link.producer].alive)
    if inputs is not None:
        inputs.rebuild()
