"""What ``shrink`` did, as data (``ShrinkReport``, JSON-ready) and as a printed ``rich`` table."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from torch import nn


@dataclass(frozen=True)
class ShrinkRow:
    """One weight layer: output units, inputs and parameters (weight + bias) before and after the cut.

    ``folded`` units had a zero incoming row: their constant output went into the next layer's bias,
    exactly. ``unused`` units had zero outgoing weights. ``kept_constant`` units had a zero incoming row
    but stay, because folding them through zero padding would not be exact (``note`` says where).
    ``collapsed``: every unit was dead; one unit with zero weights in and out stands in for the layer.
    """

    name: str
    kind: str
    units_before: int
    units_after: int
    inputs_before: int
    inputs_after: int
    params_before: int
    params_after: int
    folded: int
    unused: int
    kept_constant: int
    collapsed: bool
    note: str = ""

    @property
    def exact(self) -> bool:
        """Whether every constant unit of the layer was cut (each fold made is exact by construction)."""
        return self.kept_constant == 0


@dataclass(frozen=True)
class ShrinkReport:
    """Rows per weight layer, the whole module's parameter counts, and the kept inputs (``drop_inputs``).

    With ``drop_inputs=True``, ``kept_inputs`` are the indices along dim 1 of the original input that the
    shrunk module takes (``small(x[:, kept_inputs])``) out of ``input_width``; both ``None`` otherwise.

    Example:
        >>> row = ShrinkRow("0", "Linear", 4, 1, 3, 3, 16, 4, 2, 1, 0, False)
        >>> report = ShrinkReport((row,), 26, 14, None, None)
        >>> report.params_saved, report.constant_output, report.to_dict()["rows"][0]["exact"]
        (12, False, True)
    """

    rows: tuple[ShrinkRow, ...]
    params_before: int
    params_after: int
    kept_inputs: tuple[int, ...] | None
    input_width: int | None

    @property
    def params_saved(self) -> int:
        return self.params_before - self.params_after

    @property
    def constant_output(self) -> bool:
        """A layer collapsed: the module's output no longer depends on its input."""
        return any(row.collapsed for row in self.rows)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data: the fields, each row's ``exact`` and the derived totals."""
        out = asdict(self)
        out["rows"] = [{**asdict(row), "exact": row.exact} for row in self.rows]
        out["kept_inputs"] = list(self.kept_inputs) if self.kept_inputs is not None else None
        out.update(params_saved=self.params_saved, constant_output=self.constant_output)
        return out


def shrink_report(module: nn.Module) -> ShrinkReport:
    """The report that ``lightreg.shrink`` attached to the module it returned (a ``TracedShrinkReport`` when
    it was shrunk with ``example_inputs``)."""
    from lightreg.surgery.traced_report import TracedShrinkReport

    report = getattr(module, "shrink_report", None)
    if not isinstance(report, (ShrinkReport, TracedShrinkReport)):
        raise TypeError(f"module ({type(module).__name__}) was not made by lightreg.shrink: it has no shrink report")
    return report


def _cut(row: ShrinkRow) -> str:
    parts = [f"{row.folded} folded" if row.folded else "", f"{row.unused} unused" if row.unused else ""]
    return ", ".join(p for p in parts if p) or "-"


def print_shrink_report(report: ShrinkReport, title: str = "Shrink") -> None:
    """Print ``report`` as a ``rich`` table: one line per weight layer, then the whole module's total."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in ("layer", "kind", "units", "inputs", "params", "cut", "folds"):
        table.add_column(column, justify="left" if column in ("layer", "kind", "cut", "folds") else "right")
    for row in report.rows:
        folds = "exact" if row.exact else f"{row.kept_constant} kept (zero padding)"
        table.add_row(
            row.name, row.kind + (" (collapsed)" if row.collapsed else ""), f"{row.units_before} -> {row.units_after}",
            f"{row.inputs_before} -> {row.inputs_after}", f"{row.params_before:,} -> {row.params_after:,}", _cut(row), folds,
        )
    table.add_section()
    share = report.params_after / report.params_before if report.params_before else 1.0
    table.add_row("total", "", "", "", f"{report.params_before:,} -> {report.params_after:,} ({share:.1%})", "", "")
    notes = [row.note for row in report.rows if row.note]
    if report.kept_inputs is not None:
        notes.append(f"inputs kept: {len(report.kept_inputs)} of {report.input_width}; feed x[:, kept_inputs]")
    if report.constant_output:
        notes.append("a layer collapsed: the output no longer depends on the input")
    table.caption = "\n".join(notes) or None
    console = Console()
    if not console.is_terminal:  # rich falls back to 80 columns in logs and CI, which cuts names and figures
        console = Console(width=160)
    console.print(table)
