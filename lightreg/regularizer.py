"""The ``Regularizer`` callback: connects a penalty to the optimizer steps of a Lightning fit."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from lightreg._checks import ParameterChecks, check_distinct_names, check_patterns
from lightreg.binding import Binding, is_uninitialized
from lightreg.distributed import check_model, check_strategy, is_dtensor, local_tensor, sum_values
from lightreg.emit import is_log_step, log_scalars
from lightreg.group_lasso import with_biases
from lightreg.penalty import Penalty, Step
from lightreg.preconditioner import LazySteps, is_preconditioned, scalar_step, step_formula, step_rule, unknown_adaptive_state
from lightreg.schedules import scheduled_factor
from lightreg.selection import describe_selection, select_parameters, sparse_gradient_parameters
from lightreg.target import Point, TargetSparsity, levels_reduce, selection_dtype, zero_fraction

MODES = ("gradient", "decoupled", "proximal")


def _lr(group: dict[str, Any]) -> float:
    return float(group["lr"])  # a tensor lr costs one sync per param group, never one per parameter


def _unwrap(optimizer: Any) -> torch.optim.Optimizer:
    return getattr(optimizer, "_optimizer", optimizer)  # a LightningOptimizer wraps the real one


class Regularizer(Callback):
    """Apply ``penalty`` to the selected parameters at every real optimizer step.

    Modes (design.md): ``gradient`` adds ``∇R`` to ``.grad`` (after AMP unscaling and accumulation, before
    clipping: the same as ``R`` in the loss); ``decoupled`` takes ``w -= lr * ∇R(w)`` just before the
    step (``L2`` with Adam is AdamW); ``proximal`` (default) applies ``prox_{t R}`` right after the step
    (exact zeros; ISTA with SGD), ``t`` the step the optimizer took: per coordinate ``lr / (sqrt(v̂) + eps)``
    for Adam, AdamW, NAdam, RAdam, RMSprop and Adagrad (``lightreg.preconditioner``), so that the fixed
    points are the stationary points of ``loss + R`` with those optimizers too; ``lr`` for the others.
    Every mode acts once per real step on exactly the parameters the optimizer steps (``.grad`` of
    ``None``: skipped, as torch skips it), with the group's ``lr`` then.

    With ``target_sparsity`` (proximal mode, a penalty that makes zeros: ``L1``, ``ElasticNet``, ``L0``,
    ``GroupLasso``) alpha is not the penalty's: after every step of a ramp it is set to the level at which
    the prox zeroes exactly the ramped fraction of the selection (``lightreg.target``); then the zero
    pattern is frozen and the penalty is off for a final debias phase. Also logged: ``reg/<name>/sparsity``
    and ``reg/<name>/target``.

    Where: ``proximal`` in the step post-hook; ``gradient`` and ``decoupled`` in ``on_before_optimizer_step``
    under automatic optimization (backward runs inside ``optimizer.step``; ``decoupled`` with a grad
    scaler: the step pre-hook, never on a skipped step), in the step pre-hook under manual optimization
    (``LightningOptimizer`` or raw). Which: ``select`` intersected with what each optimizer holds when
    it steps, cached while its parameter set is unchanged (``lightreg.binding``); optimizers made mid-fit
    are hooked at the next ``on_train_batch_start``. ``LBFGS``, ``maximize=True`` and tensors
    ``Penalty.check_tensor`` refuses are refused before any weight changes (``docs/correctness.md``).

    Logs ``reg/<name>/penalty`` (``R(w)`` at the scheduled alpha of the selected parameters the optimizers
    hold, as the step left them) and ``reg/<name>/alpha`` on Lightning's log steps.

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
        if getattr(penalty, "with_bias", False) and target_sparsity is not None:
            raise ValueError(f"{penalty!r} takes no target_sparsity (its zero levels ignore the bias), got {target_sparsity!r}")
        self.penalty, self.mode, self.schedule = penalty, mode, schedule
        self.preconditioned = preconditioned
        self.include = check_patterns("include", include)
        self.exclude = check_patterns("exclude", exclude)
        self.name = name or penalty.name
        self.steps_applied = 0
        self.alpha = penalty.alpha
        self._binding = Binding(list)
        self._optimizers: dict[int, torch.optim.Optimizer] = {}
        self._handles: list[Any] = []
        self._trainer: pl.Trainer | None = None
        self._stepped = self._decay_in_pre_hook = self._keyed = False
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
        # Lightning refuses equal keys when the Trainer is built, in a message that cannot name `name=`.
        # Until setup has compared the names itself (check_distinct_names), each instance keys apart.
        return self._generate_state_key(name=self.name) if self._keyed else self._generate_state_key(instance=id(self))

    # ---- extension points -------------------------------------------------------------------
    def select(self, pl_module: pl.LightningModule) -> list[tuple[str, Tensor]]:
        """The ``(name, parameter)`` pairs to penalise; override for a rule globs cannot express.

        Called at fit start and again whenever an optimizer's parameter set changes.
        """
        return select_parameters(pl_module, self.include, self.exclude)

    def _selection(self, pl_module: pl.LightningModule) -> list[tuple[str, Tensor]]:
        return with_biases(self.penalty, pl_module, self.select(pl_module))  # GroupLasso(with_bias=True)

    def current_alpha(self, step: int) -> float:
        """``alpha * schedule(step)``: the strength used at optimizer step ``step`` (0-based)."""
        return self.penalty.alpha * scheduled_factor(self.schedule, step)

    def penalised(self) -> list[tuple[str, Tensor]]:
        """The selected ``(name, parameter)`` pairs that the hooked optimizers hold now."""
        return self._binding.held(self._optimizers.values())

    # ---- Lightning hooks ----------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_distinct_names("Regularizer", [cb.name for cb in trainer.callbacks if isinstance(cb, Regularizer)])
        self._keyed = True

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        check_strategy(trainer.strategy, f"Regularizer {self.name!r}")
        check_model(pl_module, f"Regularizer {self.name!r}")
        self.alpha = self.current_alpha(trainer.global_step)
        selected = self._selection(pl_module)
        sparse = sparse_gradient_parameters(pl_module) if self.mode == "gradient" else set()
        warn = rank_zero_warn if self.penalty.l2_part else None
        checks = ParameterChecks(f"Regularizer {self.name!r}", self.penalty.check_tensor, sparse, warn)
        for name, param in selected:
            checks.parameter(name, param)
        self._trainer, self._optimizers = trainer, {}
        self._binding = Binding(lambda: self._selection(pl_module), checks.groups)
        # A grad scaler calls optimizer.step after backward and only when the step is not skipped: there the
        # pre-step hook is the decoupled step's place; otherwise the closure's backward runs inside the step.
        self._decay_in_pre_hook = getattr(trainer.precision_plugin, "scaler", None) is not None
        if self._target is not None:
            self._target.setup(trainer.estimated_stepping_batches)
        self._hook_optimizers(trainer)  # resolves each optimizer now, so its refusals come before any step
        self._report_selection(pl_module, selected)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.alpha = self.current_alpha(trainer.global_step)  # a resumed fit's step is known only now

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self._hook_optimizers(trainer)  # setup_optimizers() mid-fit makes new ones: one dict lookup each

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if not pl_module.automatic_optimization:
            return  # backward ran before opt.step(): the pre-step hook acts, with or without the wrapper
        self._hook(optimizer)
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

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
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
        for _, _, params in self._stepped_params(optimizer):
            grads = [p.grad for p in params]
            self.penalty.apply_gradient_(self._operands(grads), self._operands(params), alpha)  # type: ignore[arg-type]

    @torch.no_grad()
    def apply_decoupled(self, optimizer: torch.optim.Optimizer, alpha: float) -> None:
        """``w -= lr * ∇R(w)`` with each param group's ``lr``, for the parameters about to be stepped."""
        for group, _, params in self._stepped_params(optimizer):
            self.penalty.apply_decay_(self._operands(params), _lr(group), alpha)

    @torch.no_grad()
    def apply_proximal(self, optimizer: torch.optim.Optimizer, alpha: float) -> None:
        """``w <- prox_{t R}(w)`` with ``t`` the step the optimizer took (``prox_steps``), for the stepped parameters;
        with a target, the level that zeroes the ramped fraction (or, frozen, the mask) instead of ``alpha``."""
        stepped = self._stepped_params(optimizer)
        work = [(self._operands(ps), self.prox_steps(_unwrap(optimizer), g, ps)) for g, _, ps in stepped]
        if self._target is not None:
            if self._target.frozen(self._last_step):
                self.alpha = 0.0
                return self._target.apply_masks_(self._named_operands(stepped))
            params = [p for _, _, ps in stepped for p in ps]
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
            if not getattr(self.penalty, "with_bias", False):
                return LazySteps(step_rule(optimizer, group), params)
            self._warn_once(optimizer, f"{self.penalty!r} joins each bias to its unit, whose prox has no per-coordinate "
                            f"form: it takes the plain lr of {type(optimizer).__name__}")
            return _lr(group)
        self._warn_unknown_adaptive(optimizer)
        return scalar_step(optimizer, group) if self.preconditioned else _lr(group)

    @torch.no_grad()
    def metrics(self) -> dict[str, Tensor | float]:
        """``reg/<name>/penalty`` (``R(w)`` of the penalised weights at the last alpha) and ``reg/<name>/alpha``."""
        params = [p for _, p in self.penalised() if not is_uninitialized(p)]
        penalty = sum_values([self.penalty.value(p, self.alpha) for p in params])  # global under FSDP2
        metrics: dict[str, Tensor | float] = {f"reg/{self.name}/penalty": penalty, f"reg/{self.name}/alpha": self.alpha}
        if self._target is not None:
            metrics[f"reg/{self.name}/sparsity"] = zero_fraction(self.penalty, self._operands(params), levels_reduce(params))
            metrics[f"reg/{self.name}/target"] = self._target.fraction(self._last_step)
        return metrics

    # ---- helpers ----------------------------------------------------------------------------
    def _stepped_params(self, optimizer: torch.optim.Optimizer) -> list[tuple[dict[str, Any], list[str], list[Tensor]]]:
        """``(live param group, names, its selected parameters that have a gradient)``, for the groups with any."""
        optimizer = _unwrap(optimizer)  # torch skips a parameter without a gradient, and so do we: no host sync
        out = []
        for g in self._binding.groups(optimizer):
            kept = [(n, p) for n, p in zip(g.names, g.params, strict=True) if p.grad is not None]
            if kept:
                out.append((optimizer.param_groups[g.index], [n for n, _ in kept], [p for _, p in kept]))
        return out

    def _named_operands(self, stepped: Sequence[tuple[Any, list[str], list[Tensor]]]) -> list[tuple[str, Tensor]]:
        return [(n, w) for _, names, ps in stepped for n, w in zip(names, self._operands(ps), strict=True)]

    def _operands(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        # An elementwise penalty acts on each FSDP2 shard alone: no DTensor dispatch, and the foreach path applies.
        return [local_tensor(t) for t in tensors] if self.penalty.elementwise else list(tensors)

    def _hook_optimizers(self, trainer: pl.Trainer) -> None:
        for optimizer in trainer.optimizers:
            self._hook(optimizer)

    def _hook(self, optimizer: torch.optim.Optimizer) -> None:
        optimizer = _unwrap(optimizer)
        if self._optimizers.get(id(optimizer)) is optimizer:
            return
        self._binding.groups(optimizer)  # refusals (LBFGS, maximize, dtype) before this optimizer's first step
        self._optimizers[id(optimizer)] = optimizer
        if self.mode != "proximal":
            self._handles.append(optimizer.register_step_pre_hook(self._pre_step_hook))
        if self._target is not None:
            self._handles.append(optimizer.register_step_pre_hook(self._freeze_hook))
        # Every mode counts the steps that really ran here; proximal also acts here.
        self._handles.append(optimizer.register_step_post_hook(self._post_step_hook))

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
        # The zero pattern is recorded before the first frozen step moves the zeros (and again after a resume
        # whose checkpoint could not hold the masks of sharded parameters: the weights still hold the zeros).
        assert self._trainer is not None and self._target is not None
        if self._target.frozen(self._trainer.global_step):
            groups = self._binding.groups(_unwrap(optimizer))
            self._target.freeze_missing([(n, w) for g in groups for n, w in zip(g.names, self._operands(g.params), strict=True)])

    def _post_step_hook(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        assert self._trainer is not None, "optimizer hook fired outside a fit"
        self._last_step = self._trainer.global_step
        self.alpha = self.current_alpha(self._trainer.global_step)
        if self.mode == "proximal":
            self.apply_proximal(optimizer, self.alpha)
        self.steps_applied += bool(self._binding.groups(optimizer))
        self._stepped = True

    def _warn_unknown_adaptive(self, optimizer: torch.optim.Optimizer) -> None:
        keys = unknown_adaptive_state(optimizer) if optimizer.state and self.preconditioned else None
        if keys:
            self._warn_once(optimizer, f"{type(optimizer).__name__} keeps per-coordinate state {keys} but its step is "
                            "not known to lightreg; the prox uses the plain lr (override Regularizer.prox_steps).")

    def _warn_once(self, optimizer: torch.optim.Optimizer, message: str) -> None:
        if id(optimizer) not in self._checked_optimizers:
            self._checked_optimizers.add(id(optimizer))
            rank_zero_warn(f"Regularizer {self.name!r}: {message}")

    def _report_selection(self, pl_module: pl.LightningModule, selected: Sequence[tuple[str, Tensor]]) -> None:
        held = {id(p) for _, p in self.penalised()}
        lines = []
        if self.mode == "proximal":
            steps = [step_formula(o) if self.preconditioned else f"{type(o).__name__}: lr" for o in self._optimizers.values()]
            lines += [f"\n  prox step  {s}" for s in steps]
        if self._target is not None:
            lines.append(f"\n  target sparsity {self._target.target:g}, {self._target.window}")
        rank_zero_info(f"Regularizer {self.name!r}: {self.penalty!r}, mode={self.mode}, "
                       + describe_selection(pl_module, selected, held) + "".join(lines))
        if selected and not held:
            rank_zero_warn(f"Regularizer {self.name!r}: no optimizer holds any selected tensor yet; it acts once one does")
