"""A per-layer sparsity report of any ``nn.Module``, as rows and as a printed table."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightreg.base.distributed import local_shards, shard_reduction
from lightreg.model.selection import effective_tensor, select_rows
from lightreg.model.masked import Masked
from lightreg.stats.figures import DEAD_COLS, DEAD_ROWS, ZEROS, figures, partial_sums

#: The columns of the printed and the W&B table, in display order; every report row has these keys.
REPORT_COLUMNS = ("name", "shape", "numel", "l1", "l2", "sparsity", "dead_rows", "dead_cols")
#: The exact counts every report row also carries: ``#(w == 0)``, ``#(all-zero rows)``, ``#(all-zero columns)``.
COUNT_KEYS = ("zeros", "dead_row_count", "dead_col_count")


@torch.no_grad()
def report_rows(names: Sequence[str], params: Sequence[Tensor | Masked]) -> list[dict[str, Any]]:
    """One row per tensor (``REPORT_COLUMNS`` and ``COUNT_KEYS``), computed in one pass with one host transfer.

    ``dead_rows`` / ``dead_cols`` are the fractions of all-zero slices along dim 0 / dim 1, and
    ``dead_row_count`` / ``dead_col_count`` their counts, ``None`` for tensors with ``ndim < 2``; an empty
    tensor's ``sparsity`` is NaN (0 of 0). ``DTensor`` shards are reduced first, so every rank must call it.
    """
    partials = partial_sums(local_shards(params), structured=True, reduce=shard_reduction(params, names))
    table = torch.cat([figures(partials, extras=["structured"]), partials[:, [ZEROS, DEAD_ROWS, DEAD_COLS]]], dim=1)
    rows = []
    for name, param, values in zip(names, params, table.tolist(), strict=True):
        l1, l2, sparsity, dead_rows, dead_cols, zeros, dead_row_count, dead_col_count = values
        structured = param.ndim >= 2
        rows.append({
            "name": name,
            "shape": tuple(param.shape),
            "numel": param.numel(),
            "l1": l1,
            "l2": l2,
            "sparsity": sparsity,
            "dead_rows": dead_rows if structured else None,
            "dead_cols": dead_cols if structured else None,
            "zeros": int(zeros),
            "dead_row_count": int(dead_row_count) if structured else None,
            "dead_col_count": int(dead_col_count) if structured else None,
        })
    return rows


def sparsity_report(
    model: nn.Module,
    include: Sequence[str] | str | None = None,
    exclude: Sequence[str] | str | None = None,
) -> list[dict[str, Any]]:
    """Per-layer ``l1 = Σ|w|``, ``l2 = √Σw²``, ``sparsity = #zeros/numel`` and dead row/column fractions and counts.

    Works on any ``nn.Module`` outside training, with the ``Regularizer``'s selection rule
    (``ndim >= 2``, no norm layers) or ``include``/``exclude`` globs. A layer pruned with
    ``torch.nn.utils.prune`` is measured as the weight it computes with (``weight_orig * weight_mask``),
    under its own name ``weight``.

    Example:
        >>> model = nn.Linear(3, 2, bias=False)
        >>> _ = model.weight.data.copy_(torch.tensor([[0.0, 0.0, 0.0], [0.0, 3.0, -4.0]]))
        >>> row = sparsity_report(model)[0]
        >>> row["name"], row["shape"], row["l1"], row["l2"], row["sparsity"], row["dead_rows"], row["dead_cols"]
        ('weight', (2, 3), 7.0, 5.0, 0.6666666666666666, 0.5, 0.3333333333333333)
        >>> row["zeros"], row["dead_row_count"], row["dead_col_count"]
        (4, 1, 1)
    """
    rows = select_rows(model, include, exclude)
    return report_rows([row.name for row in rows], [effective_tensor(row) for row in rows])


def overall_sparsity(rows: Sequence[dict[str, Any]]) -> float:
    """``Σ zeros / Σ numel`` over report rows; 0 when they hold no element at all.

    Example:
        >>> overall_sparsity([{"zeros": 2, "numel": 4}, {"zeros": 0, "numel": 0}])
        0.5
    """
    numel = sum(r["numel"] for r in rows)
    return sum(r["zeros"] for r in rows) / numel if numel else 0.0


def _fraction(value: float | None, count: int | None, total: int) -> str:
    if value is None or count is None or total == 0:
        return "-"
    return f"{value:.1%} ({count}/{total})"


def print_report(rows: Sequence[dict[str, Any]], title: str = "Weight sparsity") -> None:
    """Print ``rows`` (from ``sparsity_report``) as a ``rich`` table, with a total line."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column, justify in zip(REPORT_COLUMNS, ("left", "left") + ("right",) * 6, strict=True):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for row in rows:
        shape = row["shape"]
        table.add_row(
            row["name"], "x".join(map(str, shape)) or "scalar", f"{row['numel']:,}", f"{row['l1']:.4g}",
            f"{row['l2']:.4g}", f"{row['sparsity']:.2%}" if row["numel"] else "-",
            _fraction(row["dead_rows"], row["dead_row_count"], shape[0] if len(shape) >= 2 else 0),
            _fraction(row["dead_cols"], row["dead_col_count"], shape[1] if len(shape) >= 2 else 0),
        )
    if rows:
        table.add_section()
        numel = sum(r["numel"] for r in rows)
        table.add_row("total", "", f"{numel:,}", "", "", f"{overall_sparsity(rows):.2%}" if numel else "-", "", "")
    console = Console()
    if not console.is_terminal:  # rich falls back to 80 columns in logs and CI, which cuts names and figures
        console = Console(width=160)
    console.print(table)
