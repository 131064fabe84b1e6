"""Which selected parameters each param group of an optimizer holds, resolved when the optimizer steps.

An optimizer's parameter set changes during a fit: ``load_state_dict`` (resume, the learning-rate finder)
replaces ``param_groups`` with new dicts, ``add_param_group`` appends one (fine-tuning), a lazy parameter
materialises, and a new optimizer may replace the old one. So nothing here keeps a param-group dict: a
:class:`Binding` keeps, per optimizer, the *positions* of the groups that hold selected parameters, under
a key made of the ``param_groups`` list itself, its length, and each group's ``params`` list and length.
Checking that key costs a few identity comparisons per group; when it no longer matches, the selection is
evaluated again and intersected with what the optimizer holds. Plain torch: no Lightning here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from lightreg.base.wrapped import is_uninitialized, unwrap


class GroupParams(NamedTuple):
    """The selected parameters of the param group at position ``index`` of an optimizer's ``param_groups``."""

    index: int
    names: list[str]
    params: list[Tensor]


class _Entry(NamedTuple):
    groups: list[dict[str, Any]]  # held for identity checks only: the lr is always read from the live list
    params_lists: list[list[Tensor]]
    lengths: list[int]
    pending: list[Tensor]  # uninitialised parameters the optimizer holds: decided once they materialise
    bound: list[GroupParams]


def resolve(optimizer: torch.optim.Optimizer, selected: Sequence[tuple[str, Tensor]]) -> list[GroupParams]:
    """The selected parameters held by each param group of ``optimizer``, in the optimizer's order.

    A parameter held by no group is left out; a group holding none of them is left out.

    Example:
        >>> a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
        >>> opt = torch.optim.SGD([{"params": [a]}, {"params": [b], "lr": 0.5}], lr=0.1)
        >>> [(g.index, g.names) for g in resolve(opt, [("b", b)])]
        [(1, ['b'])]
    """
    name_of = {id(p): n for n, p in selected}
    bound = []
    for index, group in enumerate(optimizer.param_groups):
        params = [p for p in group["params"] if id(p) in name_of]
        if params:
            bound.append(GroupParams(index, [name_of[id(p)] for p in params], params))
    return bound


class Binding:
    """Per-optimizer cache of :func:`resolve`, re-resolved whenever the optimizer's parameter set changes.

    Args:
        select: returns the ``(name, parameter)`` pairs the rule selects now; called on each cache miss.
        on_resolve: called with ``(optimizer, groups)`` after each miss, e.g. to check what is new.

    Example:
        >>> w = torch.nn.Parameter(torch.ones(2))
        >>> opt = torch.optim.SGD([w], lr=0.1)
        >>> binding = Binding(lambda: [("w", w)])
        >>> [g.names for g in binding.groups(opt)]
        [['w']]
        >>> opt.load_state_dict(opt.state_dict())  # new param-group dicts: resolved again
        >>> binding.groups(opt)[0].index, binding.misses
        (0, 2)
    """

    def __init__(
        self,
        select: Callable[[], Sequence[tuple[str, Tensor]]],
        on_resolve: Callable[[torch.optim.Optimizer, list[GroupParams]], None] | None = None,
    ) -> None:
        self.select = select
        self.on_resolve = on_resolve
        self.misses = 0
        self._entries: dict[int, tuple[torch.optim.Optimizer, _Entry]] = {}

    def groups(self, optimizer: torch.optim.Optimizer) -> list[GroupParams]:
        """The selected parameters of each param group of ``optimizer`` now (cached while its key holds)."""
        cached = self._entries.get(id(optimizer))
        if cached is not None and cached[0] is optimizer and _matches(cached[1], optimizer):
            return cached[1].bound
        groups = optimizer.param_groups
        entry = _Entry(
            groups,
            [g["params"] for g in groups],
            [len(g["params"]) for g in groups],
            [p for g in groups for p in g["params"] if is_uninitialized(p)],
            resolve(optimizer, self.select()),
        )
        self.misses += 1
        if self.on_resolve is not None:
            self.on_resolve(optimizer, entry.bound)
        self._entries[id(optimizer)] = (optimizer, entry)
        return entry.bound

    def stepped(self, optimizer: torch.optim.Optimizer) -> list[tuple[dict[str, Any], list[str], list[Tensor]]]:
        """``(live param group, names, its selected parameters that have a gradient)`` for the groups with any:
        what ``optimizer`` steps now (torch skips a parameter without a gradient; checking costs no host sync)."""
        optimizer = unwrap(optimizer)
        out = []
        for g in self.groups(optimizer):
            kept = [(n, p) for n, p in zip(g.names, g.params, strict=True) if p.grad is not None]
            if kept:
                out.append((optimizer.param_groups[g.index], [n for n, _ in kept], [p for _, p in kept]))
        return out

    def held(self, optimizers: Iterable[torch.optim.Optimizer]) -> list[tuple[str, Tensor]]:
        """The selected ``(name, parameter)`` pairs that any of ``optimizers`` holds, each once, in order."""
        seen: dict[int, tuple[str, Tensor]] = {}
        for optimizer in optimizers:
            for group in self.groups(optimizer):
                seen.update({id(p): (n, p) for n, p in zip(group.names, group.params, strict=True) if id(p) not in seen})
        return list(seen.values())

    def clear(self) -> None:
        """Forget every cached optimizer."""
        self._entries.clear()


def _matches(entry: _Entry, optimizer: torch.optim.Optimizer) -> bool:
    groups = optimizer.param_groups
    if groups is not entry.groups or len(groups) != len(entry.lengths):
        return False
    for group, params, length in zip(groups, entry.params_lists, entry.lengths):
        current = group["params"]
        if current is not params or len(current) != length:
            return False
    return not any(not is_uninitialized(p) for p in entry.pending)
