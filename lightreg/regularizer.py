"""The ``Regularizer`` callback: connects a penalty to the optimizer steps of a Lightning fit."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from lightreg._checks import check_patterns
from lightreg.distributed import check_model, check_strategy, local_tensor, sum_values
from lightreg.emit import is_log_step, log_scalars
from lightreg.penalty import Penalty
from lightreg.schedules import scheduled_factor
from lightreg.selection import named_parameters_with_owner, select_parameters

MODES = ("gradient", "decoupled", "proximal")


@dataclass
class ParamGroupTarget:
    """The selected parameters of one optimizer param group; ``group`` supplies the live ``lr``."""

    optimizer: torch.optim.Optimizer
    group: dict[str, Any]
    names: list[str]
    params: list[Tensor]


def bind_to_optimizers(
    optimizers: Sequence[torch.optim.Optimizer], selected: Sequence[tuple[str, Tensor]]
) -> list[ParamGroupTarget]:
    """Group the selected parameters by the optimizer param group that updates them.

    Raises ``ValueError`` for a selected parameter that no optimizer updates: its penalty could never act.
    """
    name_of = {id(p): n for n, p in selected}
    targets, bound = [], set()
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            ids = [id(p) for p in group["params"] if id(p) in name_of and id(p) not in bound]
            if ids:
                bound.update(ids)
                params = [p for p in group["params"] if id(p) in ids]
                targets.append(ParamGroupTarget(optimizer, group, [name_of[i] for i in ids], params))
    missing = [n for n, p in selected if id(p) not in bound]
    if missing:
        raise ValueError(f"selected parameters {missing} are in no optimizer param group, so no step would penalise them")
    return targets


def with_biases(penalty: Penalty, model: torch.nn.Module, selected: Sequence[tuple[str, Tensor]]) -> list[tuple[str, Tensor]]:
    """``selected`` plus the bias of each selected weight's module, when the penalty's groups take biases in
    (``GroupLasso(with_bias=True)``, which is handed the ``(weight, bias)`` pairs); else ``selected`` unchanged.

    The bias counts as selected with its weight: it must be in an optimizer, and the penalty moves it
    together with the weight, at the weight's step. A weight whose module has no bias keeps plain row groups.
    """
    if not getattr(penalty, "with_bias", False):
        return list(selected)
    rows = {id(p): (name, owner) for name, owner, p in named_parameters_with_owner(model)}
    chosen = {id(p) for _, p in selected}
    pairs = [(w, rows[id(w)][1].bias) for _, w in selected if isinstance(getattr(rows[id(w)][1], "bias", None), Tensor)]
    penalty.pair_biases(pairs)  # type: ignore[attr-defined]
    return list(selected) + [(rows[id(b)][0], b) for _, b in pairs if id(b) not in chosen]


def _lr(group: dict[str, Any]) -> float:
    lr = group["lr"]
    return float(lr)  # a tensor lr costs one sync per param group, never one per parameter


class Regularizer(Callback):
    """Apply ``penalty`` to the selected parameters at every real optimizer step.

    Modes (design.md): ``gradient`` adds ``∇R`` to ``.grad`` in ``on_before_optimizer_step`` (after AMP
    unscaling and accumulation, before clipping: the same as ``R`` in the loss); ``decoupled`` takes
    ``w -= lr * ∇R(w)`` just before the step (``L2`` with Adam is AdamW); ``proximal`` (default) applies
    ``prox_{lr R}`` right after the step (exact zeros; ISTA with SGD). ``lr`` is the parameter's own param
    group's current learning rate. The optimizer hooks fire only when a step really runs, so never on
    accumulation micro-batches nor on steps the AMP grad scaler skips.

    Logs ``reg/<name>/penalty`` (``R(w)`` at the scheduled alpha, of the weights as the step left them)
    and ``reg/<name>/alpha`` on Lightning's log steps (``Trainer(log_every_n_steps=...)``).

    Args:
        penalty: an ``L1``, ``L2``, ``ElasticNet``, ``GroupLasso`` or other ``Penalty``.
        mode: ``"proximal"``, ``"decoupled"`` or ``"gradient"``.
        include: glob(s) on parameter names; replaces the default rule (``ndim >= 2``, no norm layers).
        exclude: glob(s) removed from the selection.
        schedule: callable ``step -> factor`` multiplying alpha (see ``lightreg.schedules``).
        name: metric and checkpoint name; defaults to the penalty's (``l1``, ``elastic_net``...). Give
            stacked Regularizers of the same penalty distinct names.

    Example:
        >>> from lightreg import L1
        >>> Regularizer(L1(1e-4), include=["encoder.*"])
        Regularizer(L1(alpha=0.0001), mode='proximal', include=('encoder.*',), exclude=None, schedule=None, name='l1')
    """

    def __init__(
        self,
        penalty: Penalty,
        mode: str = "proximal",
        include: Sequence[str] | str | None = None,
        exclude: Sequence[str] | str | None = None,
        schedule: Callable[[int], float] | None = None,
        name: str | None = None,
    ) -> None:
        if not isinstance(penalty, Penalty):
            raise TypeError(f"penalty must be a lightreg Penalty (L1, L2, ElasticNet, GroupLasso), got {penalty!r}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if schedule is not None and not callable(schedule):
            raise TypeError(f"schedule must be a callable step -> factor, got {schedule!r}")
        if name is not None and (not isinstance(name, str) or not name or "/" in name):
            raise ValueError(f"name must be a non-empty string without '/', got {name!r}")
        self.penalty = penalty
        self.mode = mode
        self.include = check_patterns("include", include)
        self.exclude = check_patterns("exclude", exclude)
        self.schedule = schedule
        self.name = name or penalty.name
        self.steps_applied = 0
        self.alpha = penalty.alpha
        self._targets: list[ParamGroupTarget] = []
        self._handles: list[Any] = []
        self._trainer: pl.Trainer | None = None
        self._stepped = False
        self._decay_in_pre_hook = False

    def __repr__(self) -> str:
        return (
            f"Regularizer({self.penalty!r}, mode={self.mode!r}, include={self.include!r}, "
            f"exclude={self.exclude!r}, schedule={self.schedule!r}, name={self.name!r})"
        )

    @property
    def state_key(self) -> str:
        return self._generate_state_key(name=self.name)

    # ---- extension points -------------------------------------------------------------------
    def select(self, pl_module: pl.LightningModule) -> list[tuple[str, Tensor]]:
        """The ``(name, parameter)`` pairs to penalise; override for a rule globs cannot express."""
        return select_parameters(pl_module, self.include, self.exclude)

    def current_alpha(self, step: int) -> float:
        """``alpha * schedule(step)``: the strength used at optimizer step ``step`` (0-based)."""
        return self.penalty.alpha * scheduled_factor(self.schedule, step)

    # ---- Lightning hooks ----------------------------------------------------------------------
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        check_strategy(trainer.strategy, f"Regularizer {self.name!r}")
        check_model(pl_module, f"Regularizer {self.name!r}")
        selected = with_biases(self.penalty, pl_module, self.select(pl_module))
        for name, param in selected:
            self.penalty.check_tensor(name, param)
        self._targets = bind_to_optimizers(trainer.optimizers, selected)
        self._trainer = trainer
        # Lightning runs the closure (forward, backward) inside optimizer.step, after its pre-step hooks, so the
        # decoupled step normally goes in on_before_optimizer_step. A grad scaler instead calls optimizer.step
        # after backward and only when the step is not skipped: there the pre-step hook is the right place.
        self._decay_in_pre_hook = getattr(trainer.precision_plugin, "scaler", None) is not None
        self._register_optimizer_hooks()
        self._warn_double_decay()
        self._report_selection(selected)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self.mode == "gradient":
            self.apply_gradient(optimizer, self.current_alpha(trainer.global_step))
        elif self.mode == "decoupled" and not self._decay_in_pre_hook:
            self.apply_decoupled(optimizer, self.current_alpha(trainer.global_step))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        # Under accumulation this fires on every micro-batch; only a batch that stepped is logged.
        stepped, self._stepped = self._stepped, False
        if stepped and is_log_step(trainer):
            log_scalars(trainer, self.metrics())

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._trainer = None

    def state_dict(self) -> dict[str, Any]:
        return {"steps_applied": self.steps_applied, "penalty": repr(self.penalty), "mode": self.mode}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.steps_applied = state_dict["steps_applied"]
        saved = (state_dict.get("penalty"), state_dict.get("mode"))
        if saved != (repr(self.penalty), self.mode):
            rank_zero_warn(f"Regularizer {self.name!r} resumes with {self.penalty!r} ({self.mode}); the checkpoint had {saved}")

    # ---- the three modes ------------------------------------------------------------------------
    @torch.no_grad()  # else g += alpha * w records w into p.grad's autograd history (and FSDP2 refuses it)
    def apply_gradient(self, optimizer: torch.optim.Optimizer, alpha: float) -> None:
        """``g += ∇R(w)`` for the selected parameters of ``optimizer`` that have a gradient."""
        for target in self._targets_of(optimizer):
            pairs = [(p.grad, p) for p in target.params if p.grad is not None]
            if pairs:
                grads, params = zip(*pairs, strict=True)
                self.penalty.apply_gradient_(self._operands(grads), self._operands(params), alpha)

    @torch.no_grad()
    def apply_decoupled(self, optimizer: torch.optim.Optimizer, alpha: float) -> None:
        """``w -= lr * ∇R(w)`` with each param group's ``lr``."""
        for target in self._targets_of(optimizer):
            self.penalty.apply_decay_(self._operands(target.params), _lr(target.group), alpha)

    @torch.no_grad()
    def apply_proximal(self, optimizer: torch.optim.Optimizer, alpha: float) -> None:
        """``w <- prox_{t R}(w)`` with ``t`` the step the optimizer took (``prox_steps``)."""
        for target in self._targets_of(optimizer):
            steps = self.prox_steps(optimizer, target.group, target.params)
            self.penalty.apply_prox_(self._operands(target.params), steps, alpha)

    def prox_steps(
        self, optimizer: torch.optim.Optimizer, group: dict[str, Any], params: Sequence[Tensor]
    ) -> float | list[float | Tensor]:
        """The prox step of each parameter: the param group's ``lr`` (one float for all of them)."""
        return _lr(group)

    @torch.no_grad()
    def metrics(self) -> dict[str, Tensor | float]:
        """``reg/<name>/penalty`` (``R(w)`` of the current weights at the last alpha) and ``reg/<name>/alpha``."""
        params = [p for target in self._targets for p in target.params]
        penalty = sum_values([self.penalty.value(p, self.alpha) for p in params])  # global under FSDP2
        return {f"reg/{self.name}/penalty": penalty, f"reg/{self.name}/alpha": self.alpha}

    # ---- helpers ----------------------------------------------------------------------------
    def _operands(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        # An elementwise penalty acts on each FSDP2 shard alone: no DTensor dispatch, and the foreach path applies.
        return [local_tensor(t) for t in tensors] if self.penalty.elementwise else list(tensors)

    def _targets_of(self, optimizer: torch.optim.Optimizer) -> list[ParamGroupTarget]:
        optimizer = getattr(optimizer, "_optimizer", optimizer)  # a LightningOptimizer wraps the real one
        return [target for target in self._targets if target.optimizer is optimizer]

    def _register_optimizer_hooks(self) -> None:
        for optimizer in {id(t.optimizer): t.optimizer for t in self._targets}.values():
            if self.mode == "decoupled" and self._decay_in_pre_hook:
                self._handles.append(optimizer.register_step_pre_hook(self._pre_step_hook))
            # Every mode counts the steps that really ran here; proximal also acts here.
            self._handles.append(optimizer.register_step_post_hook(self._post_step_hook))

    def _pre_step_hook(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        assert self._trainer is not None, "optimizer hook fired outside a fit"
        self.apply_decoupled(optimizer, self.current_alpha(self._trainer.global_step))

    def _post_step_hook(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        assert self._trainer is not None, "optimizer hook fired outside a fit"
        self.alpha = self.current_alpha(self._trainer.global_step)
        if self.mode == "proximal":
            self.apply_proximal(optimizer, self.alpha)
        self.steps_applied += 1
        self._stepped = True

    def _warn_double_decay(self) -> None:
        if not self.penalty.l2_part:
            return
        doubled = [n for t in self._targets if t.group.get("weight_decay", 0) for n in t.names]
        if doubled:
            rank_zero_warn(
                f"Regularizer {self.name!r} ({self.penalty!r}) penalises {doubled} whose optimizer param group "
                "already has weight_decay > 0: the squared norm is applied twice. Set weight_decay=0 there."
            )

    def _report_selection(self, selected: Sequence[tuple[str, Tensor]]) -> None:
        total = sum(p.numel() for _, p in selected)
        lines = [f"  {name}  {tuple(p.shape)}" for name, p in selected]
        rank_zero_info(
            f"Regularizer {self.name!r}: {self.penalty!r}, mode={self.mode}, "
            f"{len(selected)} tensors, {total:,} weights\n" + "\n".join(lines)
        )
