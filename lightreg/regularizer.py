"""The ``Regularizer`` callback: connects a penalty to the optimizer steps of a Lightning fit."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from lightreg._checks import ParameterChecks, check_distinct_names, check_patterns
from lightreg.binding import Binding, is_uninitialized
from lightreg.distributed import check_model, check_strategy, local_tensor, sum_values
from lightreg.emit import is_log_step, log_scalars
from lightreg.penalty import Penalty
from lightreg.schedules import scheduled_factor
from lightreg.selection import describe_selection, select_parameters, sparse_gradient_parameters

MODES = ("gradient", "decoupled", "proximal")


def _lr(group: dict[str, Any]) -> float:
    return float(group["lr"])  # a tensor lr costs one sync per param group, never one per parameter


def _unwrap(optimizer: Any) -> torch.optim.Optimizer:
    return getattr(optimizer, "_optimizer", optimizer)  # a LightningOptimizer wraps the real one


class Regularizer(Callback):
    """Apply ``penalty`` to the selected parameters at every real optimizer step.

    Modes (design.md): ``gradient`` adds ``∇R`` to ``.grad`` (after AMP unscaling and accumulation, before
    clipping: the same as ``R`` in the loss); ``decoupled`` takes ``w -= lr * ∇R(w)`` just before the
    step (``L2`` with Adam is AdamW); ``proximal`` (default) applies ``prox_{lr R}`` right after the step
    (exact zeros; ISTA with SGD). Every mode acts once per real step on exactly the parameters the
    optimizer steps (``.grad`` of ``None``: skipped, as torch skips it), with the group's ``lr`` then.

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
        self.penalty, self.mode, self.schedule = penalty, mode, schedule
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

    def __repr__(self) -> str:
        return (
            f"Regularizer({self.penalty!r}, mode={self.mode!r}, include={self.include!r}, "
            f"exclude={self.exclude!r}, schedule={self.schedule!r}, name={self.name!r})"
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
        selected = self.select(pl_module)
        sparse = sparse_gradient_parameters(pl_module) if self.mode == "gradient" else set()
        warn = rank_zero_warn if self.penalty.l2_part else None
        checks = ParameterChecks(f"Regularizer {self.name!r}", self.penalty.check_tensor, sparse, warn)
        for name, param in selected:
            checks.parameter(name, param)
        self._trainer, self._optimizers = trainer, {}
        self._binding = Binding(lambda: self.select(pl_module), checks.groups)
        # A grad scaler calls optimizer.step after backward and only when the step is not skipped: there the
        # pre-step hook is the decoupled step's place; otherwise the closure's backward runs inside the step.
        self._decay_in_pre_hook = getattr(trainer.precision_plugin, "scaler", None) is not None
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
        for _, params in self._stepped_params(optimizer):
            grads = [p.grad for p in params]
            self.penalty.apply_gradient_(self._operands(grads), self._operands(params), alpha)  # type: ignore[arg-type]

    @torch.no_grad()
    def apply_decoupled(self, optimizer: torch.optim.Optimizer, alpha: float) -> None:
        """``w -= lr * ∇R(w)`` with each param group's ``lr``, for the parameters about to be stepped."""
        for group, params in self._stepped_params(optimizer):
            self.penalty.apply_decay_(self._operands(params), _lr(group), alpha)

    @torch.no_grad()
    def apply_proximal(self, optimizer: torch.optim.Optimizer, alpha: float) -> None:
        """``w <- prox_{t R}(w)`` with ``t`` the step the optimizer took (``prox_steps``), for the stepped parameters."""
        for group, params in self._stepped_params(optimizer):
            steps = self.prox_steps(_unwrap(optimizer), group, params)
            self.penalty.apply_prox_(self._operands(params), steps, alpha)

    def prox_steps(
        self, optimizer: torch.optim.Optimizer, group: dict[str, Any], params: Sequence[Tensor]
    ) -> float | list[float | Tensor]:
        """The prox step of each parameter: the param group's ``lr`` (one float for all of them)."""
        return _lr(group)

    @torch.no_grad()
    def metrics(self) -> dict[str, Tensor | float]:
        """``reg/<name>/penalty`` (``R(w)`` of the penalised weights at the last alpha) and ``reg/<name>/alpha``."""
        params = [p for _, p in self.penalised() if not is_uninitialized(p)]
        penalty = sum_values([self.penalty.value(p, self.alpha) for p in params])  # global under FSDP2
        return {f"reg/{self.name}/penalty": penalty, f"reg/{self.name}/alpha": self.alpha}

    # ---- helpers ----------------------------------------------------------------------------
    def _stepped_params(self, optimizer: torch.optim.Optimizer) -> list[tuple[dict[str, Any], list[Tensor]]]:
        """``(live param group, its selected parameters that have a gradient)``, for the groups with any."""
        optimizer = _unwrap(optimizer)  # torch skips a parameter without a gradient, and so do we: no host sync
        pairs = [(g.index, [p for p in g.params if p.grad is not None]) for g in self._binding.groups(optimizer)]
        return [(optimizer.param_groups[index], params) for index, params in pairs if params]

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

    def _post_step_hook(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        assert self._trainer is not None, "optimizer hook fired outside a fit"
        self.alpha = self.current_alpha(self._trainer.global_step)
        if self.mode == "proximal":
            self.apply_proximal(optimizer, self.alpha)
        self.steps_applied += bool(self._binding.groups(optimizer))
        self._stepped = True

    def _report_selection(self, pl_module: pl.LightningModule, selected: Sequence[tuple[str, Tensor]]) -> None:
        held = {id(p) for _, p in self.penalised()}
        rank_zero_info(f"Regularizer {self.name!r}: {self.penalty!r}, mode={self.mode}, "
                       + describe_selection(pl_module, selected, held))
        if selected and not held:
            rank_zero_warn(f"Regularizer {self.name!r}: no optimizer holds any selected tensor yet; it acts once one does")
