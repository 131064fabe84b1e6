"""What a network costs: parameters and multiply-accumulates per layer, and the measured forward time."""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def call(module: nn.Module, inputs: Any) -> Any:
    """``module(**inputs)`` for a dict, ``module(*inputs)`` for a tuple, else ``module(inputs)``."""
    if isinstance(inputs, dict):
        return module(**inputs)
    if isinstance(inputs, tuple):
        return module(*inputs)
    return module(inputs)


def tensors_of(out: Any) -> Iterator[Tensor]:
    """The floating-point tensors of a model output (a tensor, tuple, list, dict or Hugging Face ``ModelOutput``)."""
    if isinstance(out, Tensor):
        if out.is_floating_point():
            yield out
    elif isinstance(out, dict):
        for v in out.values():
            yield from tensors_of(v)
    elif isinstance(out, (list, tuple)):
        for v in out:
            yield from tensors_of(v)


def layer_costs(module: nn.Module, inputs: Any) -> dict[str, tuple[int, int]]:
    """``layer name -> (parameters, multiply-accumulates per example)`` for every conv/linear/norm layer.

    A conv costs ``out elements x in_channels/groups x kernel`` MACs, a linear ``out elements x in_features``
    (per example: divided by the batch size, the first dimension of the first input tensor).

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> layer_costs(net, torch.zeros(5, 3))
        {'0': (16, 12), '2': (10, 8)}
    """
    macs: dict[str, int] = {}
    batch = next(tensors_of(inputs if not isinstance(inputs, dict) else list(inputs.values())), None)
    n = batch.shape[0] if batch is not None and batch.ndim else 1
    if batch is None:  # integer inputs (token ids)
        first = inputs if isinstance(inputs, Tensor) else next(iter(inputs.values())) if isinstance(inputs, dict) else inputs[0]
        n = first.shape[0]

    def hook(name: str):
        def record(m: nn.Module, args: Any, out: Tensor) -> None:
            if isinstance(m, nn.Linear):
                count = out.numel() * m.in_features
            else:
                count = out.numel() * (m.in_channels // m.groups) * int(torch.tensor(m.kernel_size).prod())
            macs[name] = macs.get(name, 0) + count // max(n, 1)
        return record

    layers = {name: m for name, m in module.named_modules() if isinstance(m, WEIGHTED) or _is_norm(m)}
    handles = [m.register_forward_hook(hook(name)) for name, m in layers.items() if isinstance(m, WEIGHTED)]
    try:
        with torch.no_grad():
            call(module, inputs)
    finally:
        for h in handles:
            h.remove()
    return {name: (sum(p.numel() for p in m.parameters(recurse=False)), macs.get(name, 0)) for name, m in layers.items()}


def _is_norm(m: nn.Module) -> bool:
    return isinstance(m, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm))


def forward_time(module: nn.Module, inputs: Any, repeats: int = 10) -> float:
    """Median seconds of one forward pass (no autograd), after two warm-up passes."""
    times = []
    with torch.no_grad():
        for i in range(repeats + 2):
            start = time.perf_counter()
            call(module, inputs)
            if i >= 2:
                times.append(time.perf_counter() - start)
    return statistics.median(times)
