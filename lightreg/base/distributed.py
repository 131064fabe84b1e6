"""Sharded ``DTensor`` parameters (FSDP2, tensor parallel) and every collective the package runs.

Under FSDP2 (``fully_shard``, Lightning's ``ModelParallelStrategy``) every parameter is a ``DTensor``
whose local shard holds some rows of the tensor (possibly none). The rest of the package computes on
plain tensors, local shards included, and takes the cross-rank part from here:

* statistics and histograms take a :class:`ShardReduction` (:func:`shard_reduction`): which rank's shard
  of each tensor enters a sum (:func:`counted_here`, each element once), where a shard's rows and columns
  sit in the whole tensor (:meth:`ShardReduction.place`), and the ``all_reduce`` itself;
* a separable penalty (``Penalty.separable``: ``L1``, ``L2``, ``ElasticNet``, ``L0``) gets each shard
  alone (:func:`local_tensor`); its values and zero counts add up across ranks through the same reduction;
* ``GroupLasso``, not separable, gets the ``DTensor`` and sums over groups that may span shards:
  :func:`complete_over_shards` finishes such a sum, :func:`owns_slices` says which rank reports a
  completed group, :func:`replicate` resolves a *partial* ``DTensor`` norm (``sum_g sqrt(sum_r x_rg)`` is
  not ``sqrt(sum_r sum_g x_rg)``), :func:`local_groups` slices per-group factors for this rank's shard.

Reading a value on the host needs every rank to take part: every function here that reduces is a
collective, to be called by all ranks in the same order.

The strategies whose parameters are not the module's weights (FSDP1, DeepSpeed) are refused by
``lightreg.callbacks.strategies``.
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


def owns_slices(w: Tensor, dim: int) -> bool:
    """Whether this rank reports the slices of its shard of ``w`` along ``dim`` (``GroupLasso``'s groups) in a
    sum over the ranks, once :func:`complete_over_shards` has completed them: always, unless ``w`` is sharded
    along another dimension than ``dim`` (then every rank of that mesh dimension holds the same completed
    slices) and this rank is not the first of it.

    Example:
        >>> owns_slices(torch.zeros(2, 3), dim=0)
        True
    """
    if not is_dtensor(w):
        return True
    coordinate = w.device_mesh.get_coordinate() or []
    return all(not (p.is_shard() and p.dim != dim) or coordinate[i] == 0  # type: ignore[attr-defined]
               for i, p in enumerate(w.placements))


# ---- sums over ranks of figures of local shards -----------------------------------------------------
def counted_here(name: str, t: Tensor, rank: int, world: int) -> bool:
    """Whether this rank's copy of ``t`` enters sums over all ranks: each element must be counted exactly once.

    A plain tensor is replicated (DDP), so rank 0 alone counts it; a ``DTensor`` shard counts on the
    ranks at coordinate 0 of every mesh dimension it is replicated over.

    Example:
        >>> counted_here("w", torch.zeros(2), rank=1, world=2)
        False
    """
    if not is_dtensor(t):
        return rank == 0
    mesh = t.device_mesh
    if mesh.size() != world:
        raise ValueError(f"{name}: its DTensor lives on {mesh.size()} of {world} ranks; the sums run over all ranks")
    if any(p.is_partial() for p in t.placements):
        raise ValueError(f"{name}: a DTensor with a Partial placement {t.placements} holds no weight values yet")
    coordinate = mesh.get_coordinate()
    return all(c == 0 for c, p in zip(coordinate, t.placements, strict=True) if p.is_replicate())


class ShardReduction:
    """How figures of this rank's local shards of ``tensors`` add up to figures of the whole tensors.

    Pure code computes a figure per tensor on its local shard; then sums and counts are weighted by
    :attr:`counted` (each element counted once) and summed over all ranks with ``reduction(x)``, maxima
    taken with ``reduction(x, "max")``; per-slice values along a dimension are put at their indices in
    the whole tensor with :meth:`place` first. Build it with :func:`shard_reduction`.

    Args:
        tensors: the tensors, some of them ``DTensor``s.
        names: their names, for messages.
    """

    def __init__(self, tensors: Sequence[Any], names: Sequence[str]) -> None:
        import torch.distributed as dist

        rank, world = dist.get_rank(), dist.get_world_size()
        self.tensors = list(tensors)
        self.names = list(names)
        #: Whether each tensor's local shard enters the sums on this rank.
        self.counted = [counted_here(n, t, rank, world) for n, t in zip(self.names, self.tensors, strict=True)]

    def weights(self, device: torch.device | str) -> Tensor:
        """:attr:`counted` as a float64 vector of 0s and 1s on ``device``."""
        return torch.tensor(self.counted, dtype=torch.float64).to(device)

    def place(self, i: int, dim: int, values: Tensor) -> Tensor:
        """Per-slice ``values`` of tensor ``i``'s local shard along ``dim``, at their global indices in a
        zero float64 vector of the whole tensor's length along ``dim``.

        Summed over ranks, an entry is 0 iff the slice's values are 0 on every rank (for non-negative values,
        a replica adding the same values again leaves "is it zero" unchanged).
        """
        t, name = self.tensors[i], self.names[i]
        offset = (0,) * t.ndim
        if is_dtensor(t):
            from torch.distributed.tensor import Shard
            from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

            if not all(type(p) is Shard or p.is_replicate() for p in t.placements):
                raise ValueError(
                    f"{name}: dead rows/columns need Shard or Replicate placements, got {t.placements}; "
                    "drop 'structured' from WeightMonitor(extras=...)"
                )
            _, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
        full = torch.zeros(t.shape[dim], dtype=torch.float64, device=values.device)
        full[offset[dim] : offset[dim] + values.numel()] = values.double()
        return full

    def __call__(self, x: Tensor, op: str = "sum") -> Tensor:
        """All-reduce ``x`` over all ranks (``"sum"`` or ``"max"``), in place; a collective."""
        import torch.distributed as dist

        dist.all_reduce(x, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
        return x


def shard_reduction(tensors: Sequence[Any], names: Sequence[str] | None = None) -> ShardReduction | None:
    """The :class:`ShardReduction` of ``tensors``, or ``None`` when no reduction is needed: no tensor is a
    ``DTensor`` (one process, or DDP replicas), so the figures of the local tensors are the whole ones.

    Raises ``ValueError`` for a ``DTensor`` that does not span all ranks or has a ``Partial`` placement.

    Example:
        >>> shard_reduction([torch.zeros(2)]) is None
        True
    """
    if not any(is_dtensor(t) for t in tensors) or not torch.distributed.is_initialized():
        return None
    return ShardReduction(tensors, list(names) if names is not None else [str(i) for i in range(len(tensors))])


def local_shards(tensors: Sequence[Any]) -> list[Any]:
    """:func:`local_tensor` of each tensor, detached; other objects (a pruned ``Masked`` weight) pass through.

    Example:
        >>> local_shards([torch.ones(1, requires_grad=True)])[0].requires_grad
        False
    """
    return [local_tensor(t).detach() if isinstance(t, Tensor) else t for t in tensors]


def sum_values(values: Sequence[Tensor], reduction: ShardReduction | None = None) -> Tensor:
    """Sum one scalar value per tensor into one plain tensor.

    A ``DTensor`` value (of a penalty that got the ``DTensor`` whole) is resolved by ``DTensor``: one
    collective at most. Plain values with a ``reduction`` are the values of the tensors' local shards,
    weighted by :attr:`ShardReduction.counted` and summed over the ranks (one collective); without one
    they are whole already.

    Example:
        >>> sum_values([torch.tensor(1.0), torch.tensor(2.5)])
        tensor(3.5000)
    """
    if not values:
        return torch.zeros(())
    if reduction is None or any(is_dtensor(v) for v in values):
        return global_value(torch.stack([replicate(v) for v in values]).sum())
    stacked = torch.stack(values)
    return reduction(stacked * reduction.weights(stacked.device).to(stacked.dtype)).sum()
