"""The level of a sparsity target between two exact selections: held per param group, rescaled by its lr.

Selecting the k-th zero level exactly (``lightreg.kth_value``) reads every penalised tensor twice; the level
moves slowly along the ramp, so it is selected on a few steps only and *held* in between. Every zero level is
inversely proportional to the lr of the step (``t = lr * c`` for every step rule of ``lightreg.preconditioner``:
``|w| / t``, ``w² / 2t``, ``||w / t||``), so a level ``alpha_s`` selected when a group's lr was ``lr_s`` zeroes
the same units at another lr only as

    ``alpha = alpha_s * lr_s / lr``

which is what a group gets between selections (exactly ``alpha_s`` while its lr has not changed). A warm-up or a
decay of the lr then does not move the sparsity that a held level makes. A step whose lr is 0 moves no weight, so
it zeroes nothing, and it selects nothing (``|w| / 0``): a selection due then is made at the next step with an lr.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class HeldLevels:
    """The last exact level of each param group (keyed by its first parameter's name) and the lr it was selected at.

    Example:
        >>> held = HeldLevels()
        >>> held.select(2.0, keys=["a", "b"], lrs=[0.1, 0.0])  # group b has lr 0: it keeps no level
        >>> held.alphas(keys=["a", "b"], lrs=[0.05, 0.1])  # a: 2.0 * 0.1 / 0.05
        [4.0, None]
        >>> held.missing(["a", "b"], [0.05, 0.1]), held.missing(["a", "b"], [0.05, 0.0])
        (True, False)
    """

    def __init__(self) -> None:
        self.levels: dict[str, tuple[float, float]] = {}
        #: A selection fell on a step whose lr was 0 everywhere: it is made at the next step that has an lr.
        self.pending = False

    def select(self, alpha: float, keys: Sequence[str], lrs: Sequence[float]) -> None:
        """Record ``alpha``, selected at this step, for every group with an lr."""
        self.levels.update({k: (alpha, lr) for k, lr in zip(keys, lrs, strict=True) if lr != 0})
        self.pending = False

    def missing(self, keys: Sequence[str], lrs: Sequence[float]) -> bool:
        """Whether a group with an lr has no level yet (first step, a new param group): it needs a selection."""
        return any(lr != 0 and k not in self.levels for k, lr in zip(keys, lrs, strict=True))

    def alphas(self, keys: Sequence[str], lrs: Sequence[float]) -> list[float | None]:
        """Each group's held level at its lr now; ``None`` for a group whose lr is 0 (no prox) or that has none."""
        out: list[float | None] = []
        for k, lr in zip(keys, lrs, strict=True):
            alpha, at = self.levels.get(k, (None, None))
            out.append(None if lr == 0 or alpha is None else alpha if lr == at else alpha * (at / lr))
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"levels": dict(self.levels), "pending": self.pending}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.levels, self.pending = dict(state["levels"]), state["pending"]
