"""The strategies the callbacks support, and one rule that refuses the others at fit start.

FSDP1 (``FSDPStrategy``) turns parameters into flat 1-D shards without their shapes, and DeepSpeed keeps
its own partitioned copies of the weights and gradients: a callback written against the module's tensors
would be silently wrong there. :func:`check_fit` is the one refusal every callback makes, before any
weight changes; a callback that only reads the weights (``read_only``) is refused less.
"""

from __future__ import annotations

from typing import Any

import torch

SUPPORTED_STRATEGIES = "strategy='ddp' (or 'ddp_spawn'), or FSDP2: ModelParallelStrategy(...) with fully_shard in configure_model"


def _deepspeed_stage(strategy: Any) -> str:
    config = getattr(strategy, "config", None)
    zero = config.get("zero_optimization") if isinstance(config, dict) else None
    return str(zero.get("stage", "?")) if isinstance(zero, dict) else "?"


def check_strategy(strategy: Any, who: str, *, read_only: bool = False) -> None:
    """Raise ``ValueError`` if ``who`` (e.g. ``"Regularizer 'l1'"``) cannot act correctly under ``strategy``.

    One rule for every callback: refused are the layouts in which the module's parameters are not the
    weights the callback means to see or change.

    * ``FSDPStrategy`` (FSDP1), always: parameters are flat 1-D shards that lost their shape, so neither
      the default selection rule nor ``GroupLasso`` apply, and any figure would be a shard's.
    * ``DeepSpeedStrategy`` at ZeRO stage 3, always: its parameters are flat partitions as well.
    * ``DeepSpeedStrategy`` at every stage, unless ``read_only`` (a callback that only measures the
      weights): DeepSpeed keeps gradients and fp32 master weights in its own partitioned buffers, so
      ``p.grad`` is ``None`` at the hook and a change to the module's weights is overwritten by the next step.

    Example:
        >>> from lightning.pytorch.strategies import SingleDeviceStrategy
        >>> check_strategy(SingleDeviceStrategy("cpu"), "Regularizer 'l1'")  # supported: no error
    """
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

    stage = _deepspeed_stage(strategy) if isinstance(strategy, DeepSpeedStrategy) else None
    if stage is not None and not read_only:
        raise ValueError(
            f"{who} does not support DeepSpeedStrategy (ZeRO stage {stage}): DeepSpeed keeps gradients and fp32 "
            "master weights in its own partitioned buffers, so p.grad is None when the penalty would be added and a "
            f"change to the module's weights is overwritten by the next step. Use {SUPPORTED_STRATEGIES}."
        )
    if stage == "3":
        raise ValueError(
            f"{who} does not support DeepSpeedStrategy (ZeRO stage 3): its parameters are flat partitions outside "
            f"forward, so every figure would be a partition's. Use {SUPPORTED_STRATEGIES}."
        )
    if isinstance(strategy, FSDPStrategy):
        raise ValueError(
            f"{who} does not support FSDPStrategy (FSDP1): it turns parameters into flat 1-D shards without their "
            "shapes, so the default selection (ndim >= 2) and GroupLasso cannot see them, and sums over a shard "
            f"are silently wrong. Use {SUPPORTED_STRATEGIES}."
        )


def check_model(model: torch.nn.Module, who: str) -> None:
    """Raise ``ValueError`` for FSDP1-wrapped modules and flat or DeepSpeed ZeRO parameters in ``model``.

    Catches the layouts of :func:`check_strategy` also when a model was wrapped by hand (Fabric, raw FSDP).

    Example:
        >>> check_model(torch.nn.Linear(2, 2), "Regularizer 'l1'")  # a plain module: no error
    """
    for name, module in model.named_modules():
        if type(module).__name__ == "FullyShardedDataParallel":
            raise ValueError(
                f"{who}: module {name or '<root>'!r} is wrapped by FSDP1 (FullyShardedDataParallel). Use {SUPPORTED_STRATEGIES}."
            )
    for name, param in model.named_parameters():
        if type(param).__name__ == "FlatParameter" or getattr(param, "_is_flat_param", False):
            raise ValueError(
                f"{who}: parameter {name!r} is an FSDP1 FlatParameter (a flat 1-D shard). Use {SUPPORTED_STRATEGIES}."
            )
        if hasattr(param, "ds_id") or hasattr(param, "ds_status"):
            raise ValueError(f"{who}: parameter {name!r} is a DeepSpeed ZeRO parameter. Use {SUPPORTED_STRATEGIES}.")


def check_fit(strategy: Any, model: torch.nn.Module, who: str, *, read_only: bool = False) -> None:
    """The fit-start refusal every callback makes: :func:`check_strategy`, then :func:`check_model`.

    ``read_only``: ``who`` only measures the weights (``WeightMonitor``); one that adds to gradients or
    changes weights (``Regularizer``) passes ``False``.

    Example:
        >>> from lightning.pytorch.strategies import DDPStrategy
        >>> check_fit(DDPStrategy(), torch.nn.Linear(2, 2), "WeightMonitor", read_only=True)  # no error
    """
    check_strategy(strategy, who, read_only=read_only)
    check_model(model, who)
