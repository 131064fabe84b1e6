"""The ``Regularizer`` callback: connects a penalty to the optimizer steps of a Lightning fit."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from lightreg._checks import check_patterns
from lightreg.distributed import check_model, check_strategy, is_dtensor, local_tensor, sum_values
from lightreg.emit import is_log_step, log_scalars
from lightreg.penalty import Penalty, Step
from lightreg.preconditioner import LazySteps, is_preconditioned, step_formula, step_rule, unknown_adaptive_state
from lightreg.schedules import scheduled_factor
from lightreg.selection import select_parameters
from lightreg.target import Point, TargetSparsity, levels_reduce, selection_dtype, zero_fraction

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


def _lr(group: dict[str, Any]) -> float:
    lr = group["lr"]
    return float(lr)  # a tensor lr costs one sync per param group, never one per parameter


class Regularizer(Callback):
    """Apply ``penalty`` to the selected parameters at every real optimizer step.

    Modes (design.md): ``gradient`` adds ``∇R`` to ``.grad`` in ``on_before_optimizer_step`` (after AMP
    unscaling and accumulation, before clipping: the same as ``R`` in the loss); ``decoupled`` takes
    ``w -= lr * ∇R(w)`` just before the step (``L2`` with Adam is AdamW); ``proximal`` (default) applies
    ``prox_{t R}`` right after the step (exact zeros; ISTA with SGD). ``lr`` is the parameter's own param
    group's current learning rate; the prox step ``t`` is the step the optimizer took: per coordinate
    ``lr / (sqrt(v̂) + eps)`` for Adam, AdamW, NAdam, RAdam, RMSprop and Adagrad (``lightreg.preconditioner``),
    so that the fixed points are the stationary points of ``loss + R`` with those optimizers too; ``lr`` for
    the others. The optimizer hooks fire only when a step really runs, so never on accumulation
    micro-batches nor on steps the AMP grad scaler skips.

    With ``target_sparsity`` (proximal mode, a penalty that makes zeros: ``L1``, ``ElasticNet``, ``L0``,
    ``GroupLasso``) alpha is not the penalty's: after every step of a ramp it is set to the level at which the
    prox zeroes exactly the ramped fraction of the selection (see ``lightreg.target``); then the zero pattern is
    frozen and the penalty is off for a final debias phase. Also logged: ``reg/<name>/sparsity`` and
    ``reg/<name>/target``.

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
        preconditioned: in proximal mode, use the adaptive optimizers' per-coordinate step (default);
            ``False`` uses the plain ``lr`` for every optimizer.
        target_sparsity: the final fraction of zero units (entries; groups for ``GroupLasso``), in (0, 1).
        target_ramp: ``(start, end)`` of the cubic ramp, as steps (ints) or fractions of the fit (floats);
            default ``(0, 2/3)`` of ``trainer.estimated_stepping_batches``.
        target_debias: the final phase with the zeros frozen and the penalty off, as steps or a fraction of
            the fit; default: from the end of the ramp on; ``0``: none (the level keeps tracking the target).
        target_every: select the level every n steps (1: every step, exact; larger: cheaper on big models).

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
        preconditioned: bool = True,
        target_sparsity: float | None = None,
        target_ramp: Sequence[Point] | None = None,
        target_debias: Point | None = None,
        target_every: int = 1,
    ) -> None:
        if not isinstance(penalty, Penalty):
            raise TypeError(f"penalty must be a lightreg Penalty (L1, L2, ElasticNet, GroupLasso), got {penalty!r}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if schedule is not None and not callable(schedule):
            raise TypeError(f"schedule must be a callable step -> factor, got {schedule!r}")
        if name is not None and (not isinstance(name, str) or not name or "/" in name):
            raise ValueError(f"name must be a non-empty string without '/', got {name!r}")
        if not isinstance(preconditioned, bool):
            raise TypeError(f"preconditioned must be True or False, got {preconditioned!r}")
        if penalty.proximal_only and mode != "proximal":
            raise ValueError(f"{penalty!r} has no gradient: it works only with mode='proximal', got mode={mode!r}")
        self._target = None if target_sparsity is None else TargetSparsity(target_sparsity, target_ramp, target_debias, target_every)
        if self._target is not None:
            if mode != "proximal" or not penalty.makes_zeros:
                raise ValueError(f"target_sparsity={target_sparsity!r} needs mode='proximal' and a penalty whose prox makes "
                                 f"zeros (L1, ElasticNet with l1_ratio > 0, L0, GroupLasso), got {penalty!r} in mode={mode!r}")
            if schedule is not None:
                raise ValueError(f"target_sparsity sets alpha at every step; it takes no schedule, got {schedule!r}")
        self.penalty = penalty
        self.mode = mode
        self.include = check_patterns("include", include)
        self.exclude = check_patterns("exclude", exclude)
        self.schedule = schedule
        self.name = name or penalty.name
        self.preconditioned = preconditioned
        self.steps_applied = 0
        self.alpha = penalty.alpha
        self._targets: list[ParamGroupTarget] = []
        self._handles: list[Any] = []
        self._trainer: pl.Trainer | None = None
        self._stepped = False
        self._decay_in_pre_hook = False
        self._checked_optimizers: set[int] = set()
        self._last_step = 0

    def __repr__(self) -> str:
        extra = "" if self.preconditioned else ", preconditioned=False"
        if self._target is not None:
            extra += f", target_sparsity={self._target.target!r}"
        return (
            f"Regularizer({self.penalty!r}, mode={self.mode!r}, include={self.include!r}, "
            f"exclude={self.exclude!r}, schedule={self.schedule!r}, name={self.name!r}{extra})"
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
        selected = self.select(pl_module)
        for name, param in selected:
            self.penalty.check_tensor(name, param)
        self._targets = bind_to_optimizers(trainer.optimizers, selected)
        self._trainer = trainer
        # Lightning runs the closure (forward, backward) inside optimizer.step, after its pre-step hooks, so the
        # decoupled step normally goes in on_before_optimizer_step. A grad scaler instead calls optimizer.step
        # after backward and only when the step is not skipped: there the pre-step hook is the right place.
        self._decay_in_pre_hook = getattr(trainer.precision_plugin, "scaler", None) is not None
        if self._target is not None:
            self._target.setup(trainer.estimated_stepping_batches)
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
        state = {"steps_applied": self.steps_applied, "penalty": repr(self.penalty), "mode": self.mode}
        if self._target is not None:  # sharded masks are rebuilt from the zeros of the restored weights instead
            plain = {n for t in self._targets for n, p in zip(t.names, t.params, strict=True) if not is_dtensor(p)}
            state["target"] = self._target.state_dict(plain)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.steps_applied = state_dict["steps_applied"]
        if self._target is not None and "target" in state_dict:
            self._target.load_state_dict(state_dict["target"])
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
        """``w <- prox_{t R}(w)`` with ``t`` the step the optimizer took (``prox_steps``); with a target, the
        level that zeroes the ramped fraction (or, frozen, the mask) instead of ``alpha``."""
        targets = self._targets_of(optimizer)
        work = [(self._operands(t.params), self.prox_steps(optimizer, t.group, t.params)) for t in targets]
        if self._target is not None:
            named = [(n, w) for t, (ops, _) in zip(targets, work, strict=True) for n, w in zip(t.names, ops, strict=True)]
            if self._target.frozen(self._last_step):
                self.alpha = 0.0
                return self._target.apply_masks_(named)
            params = [p for t in targets for p in t.params]
            levels = functools.partial(self._zero_levels, work)
            alpha = self.alpha = self._target.level(self._last_step, levels, selection_dtype(params), levels_reduce(params))
        for operands, steps in work:
            self.penalty.apply_prox_(operands, steps, alpha)

    def _zero_levels(self, work: Sequence[tuple[list[Tensor], float | Sequence[Step]]]) -> Iterator[Tensor]:
        # One parameter at a time; its step (a temporary) is freed before the next one is computed.
        for operands, steps in work:
            for i, w in enumerate(operands):
                yield self.penalty.zero_levels(w, steps if isinstance(steps, (int, float)) else steps[i])

    def prox_steps(
        self, optimizer: torch.optim.Optimizer, group: dict[str, Any], params: Sequence[Tensor]
    ) -> float | Sequence[Step]:
        """The prox step of each parameter: the step ``optimizer`` just took on each coordinate (one tensor per
        parameter, computed when read) when it is a known adaptive optimizer and ``preconditioned``; else the
        param group's ``lr`` (one float for all of them)."""
        if self.preconditioned and is_preconditioned(optimizer):
            return LazySteps(step_rule(optimizer, group), params)
        self._warn_unknown_adaptive(optimizer)
        return _lr(group)

    @torch.no_grad()
    def metrics(self) -> dict[str, Tensor | float]:
        """``reg/<name>/penalty`` (``R(w)`` of the current weights at the last alpha) and ``reg/<name>/alpha``."""
        params = [p for target in self._targets for p in target.params]
        penalty = sum_values([self.penalty.value(p, self.alpha) for p in params])  # global under FSDP2
        metrics: dict[str, Tensor | float] = {f"reg/{self.name}/penalty": penalty, f"reg/{self.name}/alpha": self.alpha}
        if self._target is not None:
            ops = self._operands(params)
            metrics[f"reg/{self.name}/sparsity"] = zero_fraction(self.penalty, ops, levels_reduce(params))
            metrics[f"reg/{self.name}/target"] = self._target.fraction(self._last_step)
        return metrics

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
            if self._target is not None:
                self._handles.append(optimizer.register_step_pre_hook(self._freeze_hook))
            # Every mode counts the steps that really ran here; proximal also acts here.
            self._handles.append(optimizer.register_step_post_hook(self._post_step_hook))

    def _pre_step_hook(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        assert self._trainer is not None, "optimizer hook fired outside a fit"
        self.apply_decoupled(optimizer, self.current_alpha(self._trainer.global_step))

    @torch.no_grad()
    def _freeze_hook(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        # The zero pattern is recorded before the first frozen step moves the zeros (and again after a resume
        # whose checkpoint could not hold the masks of sharded parameters: the weights still hold the zeros).
        assert self._trainer is not None and self._target is not None
        if self._target.frozen(self._trainer.global_step):
            targets = self._targets_of(optimizer)
            self._target.freeze_missing([(n, w) for t in targets for n, w in zip(t.names, self._operands(t.params), strict=True)])

    def _post_step_hook(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        assert self._trainer is not None, "optimizer hook fired outside a fit"
        self._last_step = self._trainer.global_step
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

    def _warn_unknown_adaptive(self, optimizer: torch.optim.Optimizer) -> None:
        if self.mode != "proximal" or id(optimizer) in self._checked_optimizers or not optimizer.state:
            return
        self._checked_optimizers.add(id(optimizer))
        keys = unknown_adaptive_state(optimizer)
        if keys and self.preconditioned:
            rank_zero_warn(f"Regularizer {self.name!r}: {type(optimizer).__name__} keeps per-coordinate state {keys} but its "
                           "step is not known to lightreg; the prox uses the plain lr (override Regularizer.prox_steps).")

    def _report_selection(self, selected: Sequence[tuple[str, Tensor]]) -> None:
        total = sum(p.numel() for _, p in selected)
        lines = [f"  {name}  {tuple(p.shape)}" for name, p in selected]
        if self.mode == "proximal":
            optimizers = {id(t.optimizer): t.optimizer for t in self._targets}.values()
            lines += [f"  prox step  {step_formula(o) if self.preconditioned else type(o).__name__ + ': lr'}" for o in optimizers]
        if self._target is not None:
            lines.append(f"  target sparsity {self._target.target:g}, {self._target.window}")
        rank_zero_info(
            f"Regularizer {self.name!r}: {self.penalty!r}, mode={self.mode}, "
            f"{len(selected)} tensors, {total:,} weights\n" + "\n".join(lines)
        )
