"""Weight statistics as plain tensor functions: partial sums in one pass, then the figures.

A logging step works in two stages so that sharded tensors come out exact:

1. ``partial_sums`` (or ``reduce_partial_sums`` for ``DTensor`` shards) stacks, for every tensor, the
   additive pieces ``[Σ|w|, Σw², #zeros, numel, #|w|<=eps, max|w|, #dead rows, #dead cols, rows, cols]``
   into ONE float64 tensor on the tensors' device. Sums and counts add across shards, ``max|w|``
   takes a max; nothing is formed from a shard's own figure.
2. ``figures`` turns (reduced) partial sums into ``l1 = Σ|w|``, ``l2 = √Σw²``, ``sparsity = #zeros/numel``,
   ``near_zero = #|w|<=eps / numel``, ``linf = max|w|``, ``dead_rows = #all-zero rows / rows`` and
   ``dead_cols = #all-zero columns / cols``.

Rows are slices along dim 0 (output units, conv filters), columns slices along dim 1 (input features,
input channels). No temporary is larger than one tensor, no value crosses to the host here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

#: Column order of the partial-sum table.
COLUMNS = ("abs_sum", "sq_sum", "zeros", "numel", "near_zero", "max_abs", "dead_rows", "dead_cols", "rows", "cols")
ABS, SQ, ZEROS, NUMEL, NEAR, MAX, DEAD_ROWS, DEAD_COLS, ROWS, COLS = range(len(COLUMNS))
#: The figures ``figures`` returns, in order; the last four exist only when their extra was asked for.
FIGURES = ("l1", "l2", "sparsity", "near_zero", "linf", "dead_rows", "dead_cols")
EXTRAS = ("near_zero", "linf", "structured")


def _plain(t: Tensor) -> Tensor:
    """The tensor's own storage: a ``DTensor``'s local shard, detached from autograd."""
    local = t.to_local() if hasattr(t, "to_local") else t
    return local.detach()


def _accumulate(w: Tensor) -> Tensor:
    # Half-precision results would round Σw² to 3 digits; one tensor-sized upcast is the price.
    return w.float() if w.dtype in (torch.float16, torch.bfloat16) else w


def group_nonzeros(w: Tensor) -> tuple[Tensor, Tensor]:
    """Non-zero counts per row (dim 0) and per column (dim 1) of a tensor with ``ndim >= 2``.

    Example:
        >>> w = torch.tensor([[0.0, 2.0, 0.0], [0.0, 0.0, 0.0]])
        >>> group_nonzeros(w)
        (tensor([1, 0]), tensor([0, 1, 0]))
    """
    if w.ndim < 2:
        raise ValueError(f"rows and columns need a tensor with ndim >= 2, got shape {tuple(w.shape)}")
    other_than = lambda d: tuple(i for i in range(w.ndim) if i != d)  # noqa: E731
    return torch.count_nonzero(w, dim=other_than(0)), torch.count_nonzero(w, dim=other_than(1))


def partial_sums(
    tensors: Sequence[Tensor],
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
    shard only: use ``reduce_partial_sums`` for the whole tensor.

    Example:
        >>> w = torch.tensor([[0.0, -3.0], [0.0, 4.0]])
        >>> partial_sums([w], structured=True).tolist()
        [[7.0, 25.0, 2.0, 4.0, 0.0, 0.0, 0.0, 1.0, 2.0, 2.0]]
    """
    if not tensors:
        return torch.zeros(0, len(COLUMNS), dtype=torch.float64)
    plain = [_plain(t) for t in tensors]
    device = plain[0].device
    consts = torch.zeros(len(plain), len(COLUMNS), dtype=torch.float64)
    columns: dict[int, list[Tensor]] = {ABS: [], SQ: [], ZEROS: []}
    if near_zero:
        columns[NEAR] = []
    if linf:
        columns[MAX] = []
    if structured:
        columns[DEAD_ROWS], columns[DEAD_COLS] = [], []
    zero = torch.zeros((), dtype=torch.float64, device=device)
    for i, w in enumerate(plain):
        consts[i, NUMEL] = w.numel()
        if w.numel() == 0:  # an empty shard: every sum is 0, and max|w| of nothing is 0 here
            for col in columns.values():
                col.append(zero)
            if structured and w.ndim >= 2:
                consts[i, ROWS], consts[i, COLS] = w.shape[0], w.shape[1]
            continue
        a = _accumulate(w)
        # vector_norm reduces without the |w| or w² temporaries that abs().sum() / (w*w).sum() allocate.
        columns[ABS].append(torch.linalg.vector_norm(a, ord=1).double())
        columns[SQ].append(torch.linalg.vector_norm(a, ord=2).double().square())
        columns[ZEROS].append(w.numel() - torch.count_nonzero(w).double())
        if near_zero:
            columns[NEAR].append(torch.count_nonzero(w.abs().le_(eps)).double())  # in place: one temporary
        if linf:
            columns[MAX].append(torch.linalg.vector_norm(w, ord=float("inf")).double())
        if structured:
            if w.ndim >= 2:
                rows, cols = group_nonzeros(w)
                consts[i, ROWS], consts[i, COLS] = w.shape[0], w.shape[1]
                columns[DEAD_ROWS].append((rows == 0).sum().double())
                columns[DEAD_COLS].append((cols == 0).sum().double())
            else:
                columns[DEAD_ROWS].append(zero)
                columns[DEAD_COLS].append(zero)
    table = consts.to(device)
    for index, values in columns.items():
        table[:, index] = torch.stack(values)
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
    names = ["l1", "l2", "sparsity"]
    if "near_zero" in extras:
        names.append("near_zero")
    if "linf" in extras:
        names.append("linf")
    if "structured" in extras:
        names += ["dead_rows", "dead_cols"]
    return tuple(names)


def global_sparsity(partials: Tensor) -> Tensor:
    """``Σ #zeros / Σ numel`` over every tensor of the table (a 0-d tensor).

    Example:
        >>> global_sparsity(partial_sums([torch.zeros(3), torch.ones(1)])).item()
        0.75
    """
    return partials[:, ZEROS].sum() / partials[:, NUMEL].sum()


# ---- sharded tensors ---------------------------------------------------------------------------
def is_dtensor(t: Tensor) -> bool:
    """True for a ``torch.distributed.tensor.DTensor`` (FSDP2, tensor parallel)."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _contributes(name: str, t: Tensor, rank: int, world: int) -> bool:
    """Whether this rank's copy of ``t`` enters the sums: each element must be counted exactly once.

    A plain tensor is replicated (DDP), so rank 0 alone counts it; a ``DTensor`` shard counts on the
    ranks at coordinate 0 of every mesh dimension it is replicated over.
    """
    if not is_dtensor(t):
        return rank == 0
    mesh = t.device_mesh
    if mesh.size() != world:
        raise ValueError(f"{name}: its DTensor lives on {mesh.size()} of {world} ranks; statistics reduce over all ranks")
    if any(p.is_partial() for p in t.placements):
        raise ValueError(f"{name}: a DTensor with a Partial placement {t.placements} holds no weight values yet")
    coordinate = mesh.get_coordinate()
    return all(c == 0 for c, p in zip(coordinate, t.placements, strict=True) if p.is_replicate())


def _global_group_counts(name: str, t: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row and per-column non-zero counts of this rank's part, placed at their global indices.

    Summed over ranks they are the whole tensor's counts (a replica adds the same counts again, which
    leaves "is it zero" unchanged), so a row split over ranks is dead only if it is zero everywhere.
    """
    local = _plain(t)
    rows, cols = group_nonzeros(local)
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
    full_rows = rows.new_zeros(t.shape[0], dtype=torch.float64)
    full_cols = cols.new_zeros(t.shape[1], dtype=torch.float64)
    full_rows[offset[0] : offset[0] + rows.numel()] = rows.double()
    full_cols[offset[1] : offset[1] + cols.numel()] = cols.double()
    return full_rows, full_cols


def reduce_partial_sums(
    tensors: Sequence[Tensor],
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
    non-zero counts of every tensor, one ``all_reduce(MAX)`` carries ``max|w|`` when ``linf`` is asked.
    """
    names = list(names) if names is not None else [str(i) for i in range(len(tensors))]
    if not any(is_dtensor(t) for t in tensors) or not torch.distributed.is_initialized():
        return partial_sums(tensors, eps=eps, near_zero=near_zero, linf=linf, structured=structured)
    dist = torch.distributed
    rank, world = dist.get_rank(), dist.get_world_size()
    counted = [_contributes(n, t, rank, world) for n, t in zip(names, tensors, strict=True)]
    table = partial_sums(tensors, eps=eps, near_zero=near_zero, linf=linf, structured=False)
    device = table.device
    largest = table[:, MAX].clone()  # unweighted: a replica's max is the max
    table *= torch.tensor(counted, dtype=torch.float64).to(device)[:, None]
    pieces = [table.flatten()]
    grouped = [i for i, t in enumerate(tensors) if structured and t.ndim >= 2]
    for i in grouped:
        pieces += list(_global_group_counts(names[i], tensors[i]))
    flat = torch.cat(pieces)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    reduced = flat[: table.numel()].view_as(table).clone()
    if linf:
        dist.all_reduce(largest, op=dist.ReduceOp.MAX)
        reduced[:, MAX] = largest
    start = table.numel()
    for i in grouped:
        rows, cols = tensors[i].shape[0], tensors[i].shape[1]
        row_counts, col_counts = flat[start : start + rows], flat[start + rows : start + rows + cols]
        start += rows + cols
        reduced[i, DEAD_ROWS], reduced[i, DEAD_COLS] = (row_counts == 0).sum(), (col_counts == 0).sum()
        reduced[i, ROWS], reduced[i, COLS] = rows, cols
    return reduced
