"""Weight statistics as plain tensor functions: partial sums in one pass, then the figures.

A logging step works in two stages so that sharded tensors come out exact:

1. ``partial_sums`` (or ``reduce_partial_sums`` for ``DTensor`` shards) stacks, for every tensor, the
   additive pieces ``[Σ|w|, Σw², #zeros, numel, #|w|<=eps, max|w|, #dead rows, #dead cols, rows, cols]``
   into ONE float64 tensor on the tensors' device. Across shards sums and counts add, ``max|w|`` takes
   a max, and a row/column is dead when its ``max|w|`` is 0 on every rank; nothing is formed from a
   shard's own figure.
2. ``figures`` turns (reduced) partial sums into ``l1 = Σ|w|``, ``l2 = √Σw²``, ``sparsity = #zeros/numel``,
   ``near_zero = #|w|<=eps / numel``, ``linf = max|w|``, ``dead_rows = #all-zero rows / rows`` and
   ``dead_cols = #all-zero columns / cols``.

Rows are slices along dim 0 (output units, conv filters), columns slices along dim 1 (input features,
input channels). No temporary is larger than the largest tensor, no value crosses to the host here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lightreg.distributed import is_dtensor, local_tensor

#: Column order of the partial-sum table.
COLUMNS = ("abs_sum", "sq_sum", "zeros", "numel", "near_zero", "max_abs", "dead_rows", "dead_cols", "rows", "cols")
ABS, SQ, ZEROS, NUMEL, NEAR, MAX, DEAD_ROWS, DEAD_COLS, ROWS, COLS = range(len(COLUMNS))
#: The figures ``figures`` returns, in order; the last four exist only when their extra was asked for.
FIGURES = ("l1", "l2", "sparsity", "near_zero", "linf", "dead_rows", "dead_cols")
EXTRAS = ("near_zero", "linf", "structured")


@dataclass(frozen=True)
class Masked:
    """``orig * mask``: a pruned layer's effective weight, formed only when its statistics are computed.

    ``torch.nn.utils.prune`` keeps the parameter as ``weight_orig`` and the module computes with
    ``weight_orig * weight_mask``; statistics of that product are what the model really uses. Forming
    it one tensor at a time keeps the temporaries at the size of the largest tensor.

    Example:
        >>> m = Masked(torch.tensor([[1.0, -2.0]]), torch.tensor([[0.0, 1.0]]))
        >>> m.shape, m.numel(), m.materialize()
        (torch.Size([1, 2]), 2, tensor([[ 0., -2.]]))
    """

    orig: Tensor
    mask: Tensor

    @property
    def shape(self) -> torch.Size:
        return self.orig.shape

    @property
    def ndim(self) -> int:
        return self.orig.ndim

    @property
    def dtype(self) -> torch.dtype:
        return self.orig.dtype

    @property
    def device(self) -> torch.device:
        return self.orig.device

    def numel(self) -> int:
        return self.orig.numel()

    def materialize(self) -> Tensor:
        return self.orig.detach() * self.mask


def _plain(t: Tensor | Masked) -> Tensor | Masked:
    return t if isinstance(t, Masked) else local_tensor(t).detach()  # a DTensor's own shard


def _others(w: Tensor, dim: int) -> tuple[int, ...]:
    return tuple(i for i in range(w.ndim) if i != dim)


def tensor_stats(
    w: Tensor, *, eps: float, near_zero: bool, linf: bool, structured: bool, scratch: Tensor | None = None
) -> tuple[list[Tensor], tuple[Tensor, Tensor] | None]:
    """One plain tensor's partial sums (0-d float64, in ``COLUMNS`` order up to ``max_abs``, 0 when not
    asked) and, for ``structured`` with ``ndim >= 2``, its per-row and per-column ``max|w|`` (a slice is
    all-zero iff its ``max|w|`` is 0; the vectors are ``w``'s dtype).

    One buffer of ``w``'s size (a view of ``scratch``, a flat tensor of ``w``'s dtype, when given) is
    reused for every figure: on CPU ``abs().sum()`` and float-valued
    comparisons run 5-40x faster than ``vector_norm(ord=1)`` and ``count_nonzero``. Counts are sums of
    0/1 in float32 up to 2**24 elements (exact: every partial sum is an integer <= 2**24), else float64.

    Example:
        >>> sums, (rows, cols) = tensor_stats(torch.tensor([[0.0, -2.0], [0.0, 0.0]]), eps=0.1,
        ...                                   near_zero=True, linf=True, structured=True)
        >>> [v.item() for v in sums], rows.tolist(), cols.tolist()
        ([2.0, 4.0, 3.0, 4.0, 3.0, 2.0], [2.0, 0.0], [0.0, 2.0])
    """
    zero = torch.zeros((), dtype=torch.float64, device=w.device)
    numel = torch.full((), w.numel(), dtype=torch.float64, device=w.device)
    if w.numel() == 0:  # an empty shard adds nothing, and max|w| of nothing is 0 here
        groups = (w.new_zeros(w.shape[0]), w.new_zeros(w.shape[1])) if structured and w.ndim >= 2 else None
        return [zero, zero, zero, numel, zero, zero], groups
    acc = torch.float32 if w.dtype in (torch.float16, torch.bfloat16) else w.dtype
    count = torch.float64 if w.dtype == torch.float64 or w.numel() > 2**24 else torch.float32
    buf = torch.empty_like(w) if scratch is None else scratch[: w.numel()].view(w.shape)
    torch.ne(w, 0, out=buf)  # NaN counts as non-zero, as in count_nonzero
    zeros = numel - buf.sum(dtype=count).double()
    torch.abs(w, out=buf)
    l1 = buf.sum(dtype=acc).double()
    sq = torch.linalg.vector_norm(w, 2, dtype=acc).double().square()
    largest = buf.amax().double() if linf else zero
    groups = None
    if structured and w.ndim >= 2:
        groups = (buf.amax(dim=_others(w, 0)), buf.amax(dim=_others(w, 1)))
    near = buf.le_(eps).sum(dtype=count).double() if near_zero else zero  # last use: in place
    return [l1, sq, zeros, numel, near, largest], groups


def _table(
    tensors: Sequence[Tensor | Masked], eps: float, near_zero: bool, linf: bool, structured: bool
) -> tuple[Tensor, list[tuple[Tensor, Tensor] | None]]:
    plain = [_plain(t) for t in tensors]
    # One scratch buffer per dtype and device, as large as the largest tensor, shared by all: a fresh
    # buffer per tensor costs its page faults every time (10x the arithmetic on CPU).
    sizes: dict[tuple[torch.dtype, torch.device], int] = {}
    for w in plain:
        sizes[w.dtype, w.device] = max(sizes.get((w.dtype, w.device), 0), w.numel())
    scratch = {key: torch.empty(n, dtype=key[0], device=key[1]) for key, n in sizes.items()}
    stats = [
        tensor_stats(w.materialize() if isinstance(w, Masked) else w, eps=eps, near_zero=near_zero, linf=linf,
                     structured=structured, scratch=scratch[w.dtype, w.device])
        for w in plain
    ]
    sums = torch.stack([torch.stack(s) for s, _ in stats])
    table = torch.cat([sums, sums.new_zeros(len(tensors), len(COLUMNS) - sums.shape[1])], dim=1)
    return table, [g for _, g in stats]


def _fill_groups(table: Tensor, i: int, rows: Tensor, cols: Tensor) -> None:
    table[i, DEAD_ROWS], table[i, DEAD_COLS] = (rows == 0).sum(), (cols == 0).sum()
    table[i, ROWS], table[i, COLS] = rows.numel(), cols.numel()


def partial_sums(
    tensors: Sequence[Tensor | Masked],
    *,
    eps: float = 1e-8,
    near_zero: bool = False,
    linf: bool = False,
    structured: bool = False,
) -> Tensor:
    """Stack the partial sums of every tensor into one ``[len(tensors), len(COLUMNS)]`` float64 tensor.

    Columns (``COLUMNS``): ``Σ|w|``, ``Σw²``, ``#(w == 0)``, ``numel``, ``#(|w| <= eps)``, ``max|w|``,
    ``#(all-zero rows)``, ``#(all-zero columns)``, ``rows``, ``cols``. Optional columns stay 0 unless
    asked for; rows/cols are 0 for tensors with ``ndim < 2``. A ``DTensor`` contributes its local
    shard only: use ``reduce_partial_sums`` for the whole tensor. A :class:`Masked` entry is measured as
    ``orig * mask``.

    Example:
        >>> w = torch.tensor([[0.0, -3.0], [0.0, 4.0]])
        >>> partial_sums([w], structured=True).tolist()
        [[7.0, 25.0, 2.0, 4.0, 0.0, 0.0, 0.0, 1.0, 2.0, 2.0]]
    """
    if not tensors:
        return torch.zeros(0, len(COLUMNS), dtype=torch.float64)
    table, groups = _table(tensors, eps, near_zero, linf, structured)
    for i, group in enumerate(groups):
        if group is not None:
            _fill_groups(table, i, *group)
    return table


def figures(partials: Tensor, *, extras: Sequence[str] = ()) -> Tensor:
    """Turn (reduced) partial sums into figures: one row per tensor, columns ``FIGURES[:3] + extras``.

    ``l1 = Σ|w|``, ``l2 = √Σw²``, ``sparsity = #zeros / numel``; extras ``near_zero = #(|w| <= eps) / numel``,
    ``linf = max|w|``, ``structured`` gives two columns, ``dead_rows = #all-zero rows / rows`` and
    ``dead_cols = #all-zero columns / cols`` (NaN for tensors with ``ndim < 2``). An empty tensor has
    sparsity NaN.

    Example:
        >>> w = torch.tensor([[0.0, -3.0], [0.0, 4.0]])
        >>> figures(partial_sums([w], structured=True), extras=["structured"]).tolist()
        [[7.0, 5.0, 0.5, 0.0, 0.5]]
    """
    p = partials
    out = [p[:, ABS], p[:, SQ].sqrt(), p[:, ZEROS] / p[:, NUMEL]]
    if "near_zero" in extras:
        out.append(p[:, NEAR] / p[:, NUMEL])
    if "linf" in extras:
        out.append(p[:, MAX])
    if "structured" in extras:
        out += [p[:, DEAD_ROWS] / p[:, ROWS], p[:, DEAD_COLS] / p[:, COLS]]
    return torch.stack(out, dim=1)


def figure_names(extras: Sequence[str] = ()) -> tuple[str, ...]:
    """The column names of ``figures(..., extras=extras)``.

    Example:
        >>> figure_names(["linf", "structured"])
        ('l1', 'l2', 'sparsity', 'linf', 'dead_rows', 'dead_cols')
    """
    wanted = {"l1", "l2", "sparsity", *extras} | ({"dead_rows", "dead_cols"} if "structured" in extras else set())
    return tuple(name for name in FIGURES if name in wanted)


def global_sparsity(partials: Tensor) -> Tensor:
    """``Σ #zeros / Σ numel`` over every tensor of the table (a 0-d tensor).

    Example:
        >>> global_sparsity(partial_sums([torch.zeros(3), torch.ones(1)])).item()
        0.75
    """
    return partials[:, ZEROS].sum() / partials[:, NUMEL].sum()


# ---- sharded tensors ---------------------------------------------------------------------------
def counted_here(name: str, t: Tensor, rank: int, world: int) -> bool:
    """Whether this rank's copy of ``t`` enters the sums: each element must be counted exactly once.

    A plain tensor is replicated (DDP), so rank 0 alone counts it; a ``DTensor`` shard counts on the
    ranks at coordinate 0 of every mesh dimension it is replicated over.
    """
    if not is_dtensor(t):
        return rank == 0
    mesh = t.device_mesh
    if mesh.size() != world:
        raise ValueError(
            f"{name}: its DTensor lives on {mesh.size()} of {world} ranks; statistics reduce over all ranks"
        )
    if any(p.is_partial() for p in t.placements):
        raise ValueError(f"{name}: a DTensor with a Partial placement {t.placements} holds no weight values yet")
    coordinate = mesh.get_coordinate()
    return all(c == 0 for c, p in zip(coordinate, t.placements, strict=True) if p.is_replicate())


def _global_groups(name: str, t: Tensor, rows: Tensor, cols: Tensor) -> list[Tensor]:
    """This rank's per-row/column ``max|w|`` placed at their global indices, in full-length float64 vectors.

    Summed over ranks, an entry is 0 iff the whole row/column is 0 on every rank (a replica adds the same
    non-negative values again, which leaves "is it zero" unchanged): a row split over ranks is dead only
    if it is zero everywhere.
    """
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
    out = []
    for dim, local in ((0, rows), (1, cols)):
        full = torch.zeros(t.shape[dim], dtype=torch.float64, device=local.device)
        full[offset[dim] : offset[dim] + local.numel()] = local.double()
        out.append(full)
    return out


def reduce_partial_sums(
    tensors: Sequence[Tensor | Masked],
    names: Sequence[str] | None = None,
    *,
    eps: float = 1e-8,
    near_zero: bool = False,
    linf: bool = False,
    structured: bool = False,
) -> Tensor:
    """``partial_sums`` of the WHOLE tensors when some are ``DTensor`` shards, reduced over all ranks.

    Without a ``DTensor`` (one process, DDP) it is ``partial_sums`` and no collective runs. Otherwise
    every rank must call it: one ``all_reduce(SUM)`` carries the sums, counts and per-row/column
    ``max|w|`` of every tensor, one ``all_reduce(MAX)`` carries ``max|w|`` when ``linf`` is asked.
    """
    names = list(names) if names is not None else [str(i) for i in range(len(tensors))]
    if not any(is_dtensor(t) for t in tensors) or not torch.distributed.is_initialized():
        return partial_sums(tensors, eps=eps, near_zero=near_zero, linf=linf, structured=structured)
    dist = torch.distributed
    rank, world = dist.get_rank(), dist.get_world_size()
    counted = [counted_here(n, t, rank, world) for n, t in zip(names, tensors, strict=True)]
    table, groups = _table(tensors, eps, near_zero, linf, structured)
    device = table.device
    largest = table[:, MAX].clone()  # unweighted: a replica's max is the max
    table *= torch.tensor(counted, dtype=torch.float64).to(device)[:, None]
    pieces = [table.flatten()]
    for name, t, group in zip(names, tensors, groups, strict=True):
        if group is not None:
            pieces += _global_groups(name, t, *group)
    flat = torch.cat(pieces)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    reduced = flat[: table.numel()].view_as(table).clone()
    if linf:
        dist.all_reduce(largest, op=dist.ReduceOp.MAX)
        reduced[:, MAX] = largest
    start = table.numel()
    for i, (t, group) in enumerate(zip(tensors, groups, strict=True)):
        if group is not None:
            rows, cols = t.shape[0], t.shape[1]
            _fill_groups(reduced, i, flat[start : start + rows], flat[start + rows : start + rows + cols])
            start += rows + cols
    return reduced
