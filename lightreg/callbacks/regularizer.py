"""The ``Regularizer`` callback: connects a penalty to the optimizer steps of a Lightning fit."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from lightreg.base.checks import check_distinct_names, check_patterns
from lightreg.callbacks.regularizer_checks import ParameterChecks, check_regularizer
from lightreg.callbacks.regularizer_report import penalty_in_use
from lightreg.base.wrapped import is_uninitialized, unwrap
from lightreg.callbacks.param_groups import Binding
from lightreg.penalties.coupled_group_lasso import joint_prox_
from lightreg.base.distributed import is_dtensor, local_tensor, shard_reduction, sum_values
from lightreg.callbacks.loggers import is_log_step, log_scalars
from lightreg.penalties.contract import Penalty, Step
from lightreg.proximal.fused_prox import apply_prox
from lightreg.proximal.metric import (LazySteps, has_step_rule, is_preconditioned, metric_rule, scalar_step, step_formula,
                                      step_rule, unknown_optimizer_message)
from lightreg.penalties.schedules import scheduled_factor
from lightreg.model.selection import describe_selection, select_parameters, sparse_gradient_parameters
from lightreg.callbacks.step_hooks import StepHooks
from lightreg.callbacks.strategies import check_fit
from lightreg.proximal.target import TargetSparsity, Work
from lightreg.proximal.ramp import Point

MODES = ("gradient", "decoupled", "proximal")


def _lr(group: dict[str, Any]) -> float:
    return float(group["lr"])  # a tensor lr costs one sync per param group, never one per parameter


class Regularizer(Callback):
    """Apply ``penalty`` to the selected parameters at every real optimizer step.

    Modes: ``gradient`` adds ``∇R`` to ``.grad`` (after AMP unscaling and accumulation, before
    clipping: the same as ``R`` in the loss); ``decoupled`` takes ``w -= lr * ∇R(w)`` just before the
    step (``L2`` with Adam is AdamW); ``proximal`` (default) applies ``prox_{t R}`` right after the step
    (exact zeros; ISTA with SGD), ``t`` the step the optimizer took: per coordinate ``lr / (sqrt(v̂) + eps)``
    for Adam, AdamW, NAdam, RAdam, RMSprop, Adagrad and SparseAdam (``lightreg.proximal.metric``), so that the fixed
    points are the stationary points of ``loss + R`` with those optimizers too; ``lr (1 - dampening) / (1 -
    momentum)`` for SGD with momentum, ``lr`` for the others.
    Every mode acts once per real step on exactly the parameters the optimizer steps (``.grad`` of
    ``None``: skipped, as torch skips it), with the group's ``lr`` then.

    With ``target_sparsity`` (proximal mode, a penalty that makes zeros: ``L1``, ``ElasticNet``, ``L0``, the group
    penalties) alpha is not the penalty's: on the selection steps of a ramp (every ``target_every``
    steps, and the step before the freeze) it is set to the level at which the prox zeroes exactly the
    ramped fraction of the selection; in between, that zero pattern is held (``lightreg.proximal.target``); then the
    zero pattern is frozen and the penalty is off for a final debias phase. A step with lr 0 zeroes and
    selects nothing. Also logged: ``reg/<name>/sparsity`` and ``reg/<name>/target``.

    Where: ``proximal`` in the step post-hook; ``gradient`` and ``decoupled`` in ``on_before_optimizer_step``
    under automatic optimization (backward runs inside ``optimizer.step``; ``decoupled`` with a grad
    scaler: the step pre-hook, never on a skipped step), in the step pre-hook under manual optimization
    (``LightningOptimizer`` or raw). Which: ``select`` intersected with what each optimizer holds when
    it steps, cached while its parameter set is unchanged (``lightreg.callbacks.param_groups``); optimizers made mid-fit
    are hooked at the next ``on_train_batch_start``. ``LBFGS``, ``maximize=True`` and tensors
    ``Penalty.check_tensor`` refuses are refused before any weight changes (``docs/correctness.md``).

    Logs ``reg/<name>/penalty`` (``R(w)`` at the scheduled alpha of the selected parameters the optimizers
    hold, as the step left them) and ``reg/<name>/alpha`` on Lightning's log steps.

    Args:
        penalty: an ``L1``, ``L2``, ``ElasticNet``, ``GroupLasso`` or other ``Penalty``.
        mode: ``"proximal"``, ``"decoupled"`` or ``"gradient"``.
        include: glob(s) on parameter names; replaces the default rule (``ndim >= 2``, no norm layers).
        exclude: glob(s) removed from the selection.
        schedule: callable ``step -> factor`` multiplying alpha (see ``lightreg.penalties.schedules``).
        name: metric and checkpoint name; defaults to the penalty's (``l1``, ``elastic_net``...). Give
            stacked Regularizers of the same penalty distinct names.
        preconditioned: in proximal mode, use the adaptive optimizers' per-coordinate step (default);
            ``False`` uses the plain ``lr`` for every optimizer.
        target_sparsity: the final fraction of zero units (entries; groups for the group penalties), in (0, 1).
        target_ramp: ``(start, end)`` of the cubic ramp, as steps (ints) or fractions of the fit (floats);
            default ``(0, 2/3)`` of ``trainer.estimated_stepping_batches``.
        target_debias: the final phase with the zeros frozen and the penalty off, as steps or a fraction of
            the fit; default: from the end of the ramp on; ``0``: none (the level keeps tracking the target).
        target_every: select the level exactly every n steps of the ramp (and always at the step before the
            freeze), holding its zero pattern in between; default ``clamp(ramp steps // 32, 1, 32)``; 1: every step.

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
        target_every: int | None = None,
    ) -> None:
        check_regularizer(penalty, mode, MODES, schedule, name, preconditioned)
        self._target = None if target_sparsity is None else TargetSparsity(target_sparsity, target_ramp, target_debias, target_every)
        if self._target is not None:
            self._target.check(penalty, mode, schedule)
        self.penalty, self.mode, self.schedule, self.preconditioned = penalty, mode, schedule, preconditioned
        self.include, self.exclude = check_patterns("include", include), check_patterns("exclude", exclude)
        self.name, self.alpha, self.steps_applied = name or penalty.name, penalty.alpha, 0
        self._binding, self._hooks = Binding(list), StepHooks()
        self._trainer: pl.Trainer | None = None
        self._stepped = self._decay_in_pre_hook = self._keyed = False
        self._checked_optimizers: set[int] = set()
        self._last_step = 0

    def __repr__(self) -> str:
        extra = ("" if self.preconditioned else ", preconditioned=False") + (
            "" if self._target is None else f", target_sparsity={self._target.target!r}")
        return (f"Regularizer({self.penalty!r}, mode={self.mode!r}, include={self.include!r}, "
                f"exclude={self.exclude!r}, schedule={self.schedule!r}, name={self.name!r}{extra})")

    @property
    def state_key(self) -> str:
        # Lightning refuses equal keys when the Trainer is built, in a message that cannot name `name=`.
        # Until setup has compared the names itself (check_distinct_names), each instance keys apart.
        return self._generate_state_key(name=self.name) if self._keyed else self._generate_state_key(instance=id(self))

    @property
    def target(self) -> TargetSparsity | None:
        """The target sparsity that sets alpha (its window, level and zero pattern), or ``None``."""
        return self._target

    @property
    def hooked(self) -> list[torch.optim.Optimizer]:
        """The optimizers whose steps this callback is hooked into now (none before fit start and after the fit)."""
        return self._hooks.optimizers if self._hooks.handles else []

    # ---- extension points -------------------------------------------------------------------
    def select(self, pl_module: pl.LightningModule) -> list[tuple[str, Tensor]]:
        """The ``(name, parameter)`` pairs to penalise; override for a rule globs cannot express.

        Called at fit start and again whenever an optimizer's parameter set changes.
        """
        return select_parameters(pl_module, self.include, self.exclude)

    def _selection(self, pl_module: pl.LightningModule) -> list[tuple[str, Tensor]]:
        return self.penalty.bind(pl_module, self.select(pl_module))  # with the tensors the penalty's groups add

    def current_alpha(self, step: int) -> float:
        """``alpha * schedule(step)``: the strength used at optimizer step ``step`` (0-based)."""
        return self.penalty.alpha * scheduled_factor(self.schedule, step)

    def penalised(self) -> list[tuple[str, Tensor]]:
        """The selected ``(name, parameter)`` pairs that the hooked optimizers hold now."""
        return self._binding.held(self._hooks.optimizers)

    # ---- Lightning hooks ----------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_distinct_names("Regularizer", [cb.name for cb in trainer.callbacks if isinstance(cb, Regularizer)])
        self._keyed = True

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        check_fit(trainer.strategy, pl_module, f"Regularizer {self.name!r}")
        self.alpha, self._trainer = self.current_alpha(trainer.global_step), trainer
        selected = self._bind(pl_module)
        # A grad scaler calls optimizer.step after backward and only when the step is not skipped: there the
        # pre-step hook is the decoupled step's place; otherwise the closure's backward runs inside the step.
        self._decay_in_pre_hook = getattr(trainer.precision_plugin, "scaler", None) is not None
        if self._target is not None:
            self._target.setup(trainer.estimated_stepping_batches)
        self._hooks.hook_all(trainer.optimizers)
        self._report_selection(pl_module, selected)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.alpha = self.current_alpha(trainer.global_step)  # a resumed fit's step is known only now

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self._hooks.hook_all(trainer.optimizers)  # setup_optimizers() mid-fit makes new ones

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if not pl_module.automatic_optimization:
            return  # backward ran before opt.step(): the pre-step hook acts, with or without the wrapper
        self._hooks.hook(optimizer)
        if self.mode == "gradient":
            self.apply_gradient(optimizer, self.current_alpha(trainer.global_step))
        elif self.mode == "decoupled" and not self._decay_in_pre_hook:
            self.apply_decoupled(optimizer, self.current_alpha(trainer.global_step))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        # Under accumulation this fires on every micro-batch; only a batch that stepped is logged.
        stepped, self._stepped = self._stepped, False
        if stepped and trainer.global_step == 0 and self.schedule is not None:  # raw optimizers, manual optimization
            rank_zero_warn(f"Regularizer {self.name!r}: trainer.global_step does not advance when training_step steps "
                           "raw optimizers, so the schedule stays at step 0; step self.optimizers() instead")
        if stepped and is_log_step(trainer):
            log_scalars(trainer, self.metrics())

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """With a target: warn, with the sparsity reached, when the fit ended before its window did."""
        short = self._target and self._target.ended_short(self._target.step_index(trainer.global_step))
        if short:  # on every rank: the sparsity is a collective
            rank_zero_warn(f"Regularizer {self.name!r}: " + short.format(sparsity=float(self.metrics()[f"reg/{self.name}/sparsity"])))

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._hooks.remove(forget=False)  # penalised() still answers after the fit
        self._trainer = None

    def state_dict(self) -> dict[str, Any]:
        state = {"steps_applied": self.steps_applied, "penalty": repr(self.penalty), "mode": self.mode}
        if self._target is not None:  # sharded masks are rebuilt from the zeros of the restored weights instead
            state["target"] = self._target.state_dict({n for n, p in self.penalised() if not is_dtensor(p)})
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
        for _, _, params in self._binding.stepped(optimizer):
            grads = [p.grad for p in params]
            self.penalty.apply_gradient_(self._operands(grads), self._operands(params), alpha)  # type: ignore[arg-type]

    @torch.no_grad()
    def apply_decoupled(self, optimizer: torch.optim.Optimizer, alpha: float) -> None:
        """``w -= lr * ∇R(w)`` with each param group's ``lr``, for the parameters about to be stepped."""
        for group, _, params in self._binding.stepped(optimizer):
            self.penalty.apply_decay_(self._operands(params), _lr(group), alpha)

    @torch.no_grad()
    def apply_proximal(self, optimizer: torch.optim.Optimizer, alpha: float) -> None:
        """``w <- prox_{t R}(w)`` with ``t`` the step the optimizer took (``prox_steps``), for the stepped parameters;
        with a target, the level that zeroes the ramped fraction (or, frozen, the mask) instead of ``alpha``."""
        stepped = self._binding.stepped(optimizer)
        work: list[Work] = [(names, self._operands(ps), self.prox_steps(unwrap(optimizer), g, ps), _lr(g))
                            for g, names, ps in stepped]
        if self._target is not None:
            reduction = shard_reduction([p for _, _, ps in stepped for p in ps])
            # The eager prox on a selection step: it rounds as the zero levels do, so it zeroes exactly the count.
            self._target.prox_after_step(self._last_step, self.penalty, work, reduction)
            self.alpha = self._target.alpha
        elif alpha != 0.0 and not joint_prox_(self.penalty, work, alpha):  # the prox at alpha 0 is the identity
            for _, operands, steps, _ in work:
                apply_prox(self.penalty, operands, steps, alpha)  # a fused kernel where one applies

    def prox_steps(
        self, optimizer: torch.optim.Optimizer, group: dict[str, Any], params: Sequence[Tensor]
    ) -> float | Sequence[Step]:
        """The prox step of each parameter: the step ``optimizer`` just took on each coordinate, bounded (one tensor
        per parameter, computed when read) when its rule is known (``lightreg.proximal.metric``; ``register_step_rule``)
        and ``preconditioned``; else the param group's ``lr`` (one float for all of them); 0 when ``lr`` is 0."""
        if self.preconditioned and has_step_rule(optimizer) and _lr(group) != 0.0:
            if self.penalty.coordinate_steps or not is_preconditioned(optimizer):
                return LazySteps(step_rule(optimizer, group), params, metric_rule(optimizer, group))
            self._warn_once(optimizer, f"{self.penalty!r} has no prox with a per-coordinate step: it takes the plain "
                            f"lr of {type(optimizer).__name__}")
            return _lr(group)
        if self.preconditioned:
            self._warn_once(optimizer, None, unknown_optimizer_message(optimizer, f"Regularizer {self.name!r}"))
        return scalar_step(optimizer, group) if self.preconditioned else _lr(group)

    @torch.no_grad()
    def metrics(self) -> dict[str, Tensor | float]:
        """``reg/<name>/penalty`` (``R(w)`` of the penalised weights at the last alpha) and ``reg/<name>/alpha``."""
        params = [p for _, p in self.penalised() if not is_uninitialized(p)]
        operands, reduction = self._operands(params), shard_reduction(params)  # global sums under FSDP2
        penalty = sum_values([self.penalty.value(w, self.alpha) for w in operands], reduction)
        metrics: dict[str, Tensor | float] = {f"reg/{self.name}/penalty": penalty, f"reg/{self.name}/alpha": self.alpha}
        metrics.update(self.penalty.metrics(self.name))  # e.g. CoupledGroupLasso: reg/<name>/groups_alive
        if self._target is not None:
            metrics.update(self._target.metrics(self.name, self.penalty, operands, reduction, self._last_step))
        return metrics

    # ---- helpers ----------------------------------------------------------------------------
    def _bind(self, pl_module: pl.LightningModule) -> list[tuple[str, Tensor]]:
        """Check the selection, bind it to the optimizers as they step, and make the step hooks; return it."""
        selected = self._selection(pl_module)
        sparse = sparse_gradient_parameters(pl_module) if self.mode == "gradient" else set()
        warn = rank_zero_warn if self.penalty.l2_part else None
        checks = ParameterChecks(f"Regularizer {self.name!r}", self.penalty.check_tensor, sparse, warn)
        for name, param in selected:
            checks.parameter(name, param)
        self._binding = Binding(lambda: self._selection(pl_module), checks.groups)
        # The binding resolves a new optimizer before it is hooked, so its refusals come before any step.
        pre = ([self._pre_step_hook] if self.mode != "proximal" else []) + ([self._freeze_hook] if self._target else [])
        self._hooks = StepHooks(post=[self._post_step_hook], pre=pre, on_new=self._binding.groups)
        return selected

    def _operands(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        # A separable penalty acts on each FSDP2 shard alone: no DTensor dispatch, and the foreach path applies.
        return [local_tensor(t) for t in tensors] if self.penalty.separable else list(tensors)

    def _pre_step_hook(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        trainer = self._trainer
        assert trainer is not None, "optimizer hook fired outside a fit"
        manual = not trainer.lightning_module.automatic_optimization
        if manual and self.mode == "gradient":
            self.apply_gradient(optimizer, self.current_alpha(trainer.global_step))
        elif self.mode == "decoupled" and (manual or self._decay_in_pre_hook):
            self.apply_decoupled(optimizer, self.current_alpha(trainer.global_step))

    @torch.no_grad()
    def _freeze_hook(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        assert self._trainer is not None and self._target is not None
        groups = lambda: self._binding.groups(unwrap(optimizer))  # noqa: E731
        self._target.before_step(self._target.step_index(self._trainer.global_step), lambda: [
            (n, w) for g in groups() for n, w in zip(g.names, self._operands(g.params), strict=True)])

    def _post_step_hook(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        # Every mode counts here the steps that really ran; proximal also acts here.
        assert self._trainer is not None, "optimizer hook fired outside a fit"
        step = self._last_step = self._trainer.global_step
        if self._target is not None:  # the ramp also counts steps that do not advance global_step (raw optimizers)
            self._last_step = self._target.count_step(step)
        self.alpha = self.current_alpha(step)
        if self.mode == "proximal":
            self.apply_proximal(optimizer, self.alpha)
        self.steps_applied += bool(self._binding.groups(optimizer))
        self._stepped = True

    def _warn_once(self, optimizer: torch.optim.Optimizer, message: str | None, whole: str | None = None) -> None:
        if id(optimizer) not in self._checked_optimizers:
            self._checked_optimizers.add(id(optimizer))
            if message or whole:
                rank_zero_warn(whole or f"Regularizer {self.name!r}: {message}")

    def _report_selection(self, pl_module: pl.LightningModule, selected: Sequence[tuple[str, Tensor]]) -> None:
        held = {id(p) for _, p in self.penalised()}
        lines = [f"\n  prox step  {step_formula(o, self.preconditioned)}" for o in self._hooks.optimizers
                 if self.mode == "proximal"] + ([f"\n  {self._target}"] if self._target is not None else [])
        rank_zero_info(f"Regularizer {self.name!r}: {penalty_in_use(self.penalty, self._target)}, mode={self.mode}, "
                       + describe_selection(pl_module, selected, held) + "".join(lines))
        if selected and not held:
            rank_zero_warn(f"Regularizer {self.name!r}: no optimizer holds any selected tensor yet; it acts once one does")
