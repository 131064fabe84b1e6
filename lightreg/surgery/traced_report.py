"""What ``shrink(module, example_inputs=...)`` did: parameters and MACs per layer, forward time, as data."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class TracedShrinkRow:
    """One conv/linear/norm layer: parameters and multiply-accumulates per example, before and after.

    ``removed``: units of the groups rooted at this layer that were cut; ``kept``: constant units that stay
    because folding their constant would not be exact (zero padding).
    """

    name: str
    kind: str
    params_before: int
    macs_before: int
    params_after: int
    macs_after: int
    removed: int = 0
    kept: int = 0


@dataclass(frozen=True)
class TracedShrinkReport:
    """Per-layer rows, totals, the measured forward times (seconds, median) and the largest output change.

    Example:
        >>> row = TracedShrinkRow("0", "Conv2d", 100, 1000, 50, 500, 2, 0)
        >>> report = TracedShrinkReport((row,), 120, 70, 2e-3, 1e-3, 0.0, ())
        >>> report.macs_before, report.macs_after, round(report.speedup, 2)
        (1000, 500, 2.0)
    """

    rows: tuple[TracedShrinkRow, ...]
    params_before: int
    params_after: int
    time_before: float
    time_after: float
    max_abs_diff: float
    skipped: tuple[tuple[str, str], ...]  # (group root, why it is not removable)

    @property
    def macs_before(self) -> int:
        return sum(r.macs_before for r in self.rows)

    @property
    def macs_after(self) -> int:
        return sum(r.macs_after for r in self.rows)

    @property
    def speedup(self) -> float:
        return self.time_before / self.time_after if self.time_after else float("nan")

    @property
    def params_saved(self) -> int:
        return self.params_before - self.params_after

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data, with the totals."""
        out = asdict(self)
        out["skipped"] = [list(s) for s in self.skipped]
        out.update(macs_before=self.macs_before, macs_after=self.macs_after, params_saved=self.params_saved)
        return out


def print_traced_report(report: TracedShrinkReport, title: str = "Shrink") -> None:
    """Print ``report`` as a ``rich`` table: one line per layer, the totals and the forward times."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in ("layer", "kind", "params", "MACs / example", "removed", "kept"):
        table.add_column(column, justify="left" if column in ("layer", "kind") else "right")
    for r in report.rows:
        table.add_row(r.name, r.kind, f"{r.params_before:,} -> {r.params_after:,}",
                      f"{r.macs_before:,} -> {r.macs_after:,}", str(r.removed or "-"), str(r.kept or "-"))
    table.add_section()
    table.add_row("total", "", f"{report.params_before:,} -> {report.params_after:,}",
                  f"{report.macs_before:,} -> {report.macs_after:,}", "", "")
    table.caption = (f"forward {report.time_before * 1e3:.3f} ms -> {report.time_after * 1e3:.3f} ms "
                     f"({report.speedup:.2f}x); max output change {report.max_abs_diff:.2g}")
    console = Console()
    if not console.is_terminal:
        console = Console(width=160)
    console.print(table)
