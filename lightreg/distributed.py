"""Parameters under distributed strategies: sharded ``DTensor``s (FSDP2) and the layouts we refuse.

Under FSDP2 (``fully_shard``, Lightning's ``ModelParallelStrategy``) every parameter is a ``DTensor``
whose local shard holds some rows of the tensor (possibly none). Elementwise ops (``sign``, ``clamp``,
``mul_``...) act on the shard, so ``L1``/``L2``/``ElasticNet`` need nothing more; any *sum* over the
tensor (a penalty value, a group norm that spans shards) is only right after a cross-rank reduction,
which ``DTensor`` performs when asked for a replicated or full value. Two ``DTensor`` details matter:

* a norm over a sharded dimension comes back as a *partial* norm; ``.sum()`` of it keeps the partial
  placement and then reduces it as a norm again, which is wrong (``sum_g sqrt(sum_r x_rg)`` is not
  ``sqrt(sum_r sum_g x_rg)``). :func:`replicate` resolves the partial value first.
* reading a value on the host needs every rank to take part: :func:`global_value` is a collective.
* an in-place update by a per-group factor (``GroupLasso``) has no placement-preserving ``DTensor``
  rule when groups run across the shards: it is done on :func:`local_tensor` with the shard's slice
  of the (global) factors, :func:`local_groups`.

FSDP1 (``FSDPStrategy``) turns parameters into flat 1-D shards without their shapes, and DeepSpeed keeps
its own partitioned copies of the weights and gradients: penalties written against the module's tensors
would be silently wrong there, so :func:`check_fit` refuses them at fit start, with one rule for every
callback.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

try:  # torch built without distributed support has no DTensor, and then no parameter is one.
    from torch.distributed.tensor import DTensor, Replicate
except ImportError:  # pragma: no cover - every supported torch wheel ships torch.distributed
    DTensor = None  # type: ignore[assignment,misc]
    Replicate = None  # type: ignore[assignment,misc]

SUPPORTED = "strategy='ddp' (or 'ddp_spawn'), or FSDP2: ModelParallelStrategy(...) with fully_shard in configure_model"


def is_dtensor(t: object) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (an FSDP2 / tensor-parallel parameter).

    Example:
        >>> is_dtensor(torch.zeros(2))
        False
    """
    return DTensor is not None and isinstance(t, DTensor)


def replicate(t: Tensor) -> Tensor:
    """Resolve a ``DTensor`` with a partial placement into a replicated one; other tensors pass through.

    Call it on a reduction over a possibly sharded dimension before reducing it further.

    Example:
        >>> replicate(torch.tensor([3.0, 4.0]))
        tensor([3., 4.])
    """
    if not is_dtensor(t) or not any(p.is_partial() for p in t.placements):
        return t
    placements = [Replicate() if p.is_partial() else p for p in t.placements]
    return t.redistribute(t.device_mesh, placements)


def global_value(t: Tensor) -> Tensor:
    """The whole (all-gathered, reduced) value of ``t`` as a plain tensor; a collective for a ``DTensor``.

    Every rank of the mesh must call it, in the same order.

    Example:
        >>> global_value(torch.tensor(1.5))
        tensor(1.5000)
    """
    return t.full_tensor() if is_dtensor(t) else t


def local_tensor(t: Tensor) -> Tensor:
    """This rank's shard of a ``DTensor`` (maybe empty), or ``t`` itself.

    Example:
        >>> local_tensor(torch.ones(2)).shape
        torch.Size([2])
    """
    # _local_tensor is the shard itself; to_local() would return an autograd view that refuses in-place updates.
    return t._local_tensor if is_dtensor(t) else t


def local_groups(v: Tensor, w: Tensor, dim: int) -> Tensor:
    """The entries of the per-group vector ``v`` (one per index of ``w``'s ``dim``) for this rank's shard of ``w``.

    For a plain ``w`` that is ``v`` itself. For a ``DTensor`` ``w`` it is a plain tensor: the slice of the
    whole ``v`` at the shard's offset along ``dim`` (all of it when ``dim`` is not sharded), so that an
    in-place update of ``w.to_local()`` by group needs no placement change.

    Example:
        >>> local_groups(torch.tensor([1.0, 2.0]), torch.zeros(2, 3), dim=0)
        tensor([1., 2.])
    """
    if not is_dtensor(w):
        return v
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(w.shape, w.device_mesh, w.placements)
    return global_value(v).narrow(0, offset[dim], shape[dim])


def complete_over_shards(v: Tensor, w: Tensor, keep_dim: int | None, op: str = "sum") -> Tensor:
    """Finish a reduction of ``w``'s local shard across the ranks that hold the rest of it, in place.

    ``v`` reduces ``local_tensor(w)`` over every dimension but ``keep_dim`` (all of them for ``None``) with
    ``op`` (``"sum"`` or ``"max"``); for a ``DTensor`` sharded along another dimension it is all-reduced
    over that mesh dimension. Along ``keep_dim`` itself each rank keeps its own slice: the result then
    describes this rank's part of ``keep_dim``, whole. A plain ``w`` passes ``v`` through. A collective
    for a sharded ``w``: every rank must call it, in the same order.

    Example:
        >>> complete_over_shards(torch.tensor([3.0]), torch.zeros(1, 2), keep_dim=0)
        tensor([3.])
    """
    if not is_dtensor(w):
        return v
    import torch.distributed as dist

    reduce_op = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op]
    for mesh_dim, placement in enumerate(w.placements):
        if placement.is_shard() and placement.dim != keep_dim:  # type: ignore[attr-defined]
            dist.all_reduce(v, reduce_op, group=w.device_mesh.get_group(mesh_dim))
    return v


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
            f"change to the module's weights is overwritten by the next step. Use {SUPPORTED}."
        )
    if stage == "3":
        raise ValueError(
            f"{who} does not support DeepSpeedStrategy (ZeRO stage 3): its parameters are flat partitions outside "
            f"forward, so every figure would be a partition's. Use {SUPPORTED}."
        )
    if isinstance(strategy, FSDPStrategy):
        raise ValueError(
            f"{who} does not support FSDPStrategy (FSDP1): it turns parameters into flat 1-D shards without their "
            "shapes, so the default selection (ndim >= 2) and GroupLasso cannot see them, and sums over a shard "
            f"are silently wrong. Use {SUPPORTED}."
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
                f"{who}: module {name or '<root>'!r} is wrapped by FSDP1 (FullyShardedDataParallel). Use {SUPPORTED}."
            )
    for name, param in model.named_parameters():
        if type(param).__name__ == "FlatParameter" or getattr(param, "_is_flat_param", False):
            raise ValueError(
                f"{who}: parameter {name!r} is an FSDP1 FlatParameter (a flat 1-D shard). Use {SUPPORTED}."
            )
        if hasattr(param, "ds_id") or hasattr(param, "ds_status"):
            raise ValueError(f"{who}: parameter {name!r} is a DeepSpeed ZeRO parameter. Use {SUPPORTED}.")


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


def sum_values(values: Sequence[Tensor]) -> Tensor:
    """Sum scalar penalty values, some possibly ``DTensor``s, into one plain tensor (one collective at most).

    Example:
        >>> sum_values([torch.tensor(1.0), torch.tensor(2.5)])
        tensor(3.5000)
    """
    if not values:
        return torch.zeros(())
    return global_value(torch.stack([replicate(v) for v in values]).sum())
