"""Every figure of lightreg.stats.figures against torch.linalg.vector_norm and explicit counts."""

from __future__ import annotations

import math

import pytest
import torch

from lightreg.stats.report import print_report, sparsity_report
from lightreg.stats.figures import (
    COLUMNS,
    FIGURES,
    figure_names,
    figures,
    global_sparsity,
    partial_sums,
)

ALL = ["near_zero", "linf", "structured"]


def hand_built():
    """Tensors with known zeros, dead rows (dim 0) and dead columns (dim 1)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(5, 4, generator=g, dtype=torch.float64)
    a[1] = 0.0  # one dead row
    a[:, 2] = 0.0  # one dead column
    a[3, 0] = 1e-9  # near zero, not zero
    conv = torch.randn(6, 3, 2, 2, generator=g, dtype=torch.float64)
    conv[0] = 0.0
    conv[4] = 0.0  # two dead filters
    conv[:, 1] = 0.0  # one dead input channel
    conv[2, 0, 1, 1] = 0.0  # a lone zero
    vec = torch.tensor([0.0, -2.0, 0.0, 5e-9, 3.0], dtype=torch.float64)
    return [a, conv, vec]


def explicit(w: torch.Tensor, eps: float) -> dict[str, float]:
    """The oracle: element loops and vector_norm, written independently of the module."""
    flat = w.flatten().tolist()
    out = {
        "l1": torch.linalg.vector_norm(w, 1).item(),
        "l2": torch.linalg.vector_norm(w, 2).item(),
        "sparsity": sum(v == 0 for v in flat) / len(flat),
        "near_zero": sum(abs(v) <= eps for v in flat) / len(flat),
        "linf": max(abs(v) for v in flat),
    }
    if w.ndim >= 2:
        rows = [all(v == 0 for v in w[i].flatten().tolist()) for i in range(w.shape[0])]
        cols = [all(v == 0 for v in w[:, j].flatten().tolist()) for j in range(w.shape[1])]
        out["dead_rows"] = sum(rows) / len(rows)
        out["dead_cols"] = sum(cols) / len(cols)
    return out


def test_every_figure_matches_the_oracle():
    tensors, eps = hand_built(), 1e-8
    table = figures(partial_sums(tensors, eps=eps, near_zero=True, linf=True, structured=True), extras=ALL)
    assert figure_names(ALL) == FIGURES
    for w, row in zip(tensors, table.tolist(), strict=True):
        want = explicit(w, eps)
        got = dict(zip(FIGURES, row, strict=True))
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=1e-14, abs=0), key
        if w.ndim < 2:
            assert math.isnan(got["dead_rows"]) and math.isnan(got["dead_cols"])
    # the hand-built structure is really there, so the oracle is not vacuous
    assert explicit(tensors[0], eps)["dead_rows"] == 1 / 5 and explicit(tensors[1], eps)["dead_rows"] == 2 / 6
    assert explicit(tensors[1], eps)["dead_cols"] == 1 / 3


def test_partial_sum_columns_are_exact_counts():
    a, conv, vec = hand_built()
    table = partial_sums([a, conv, vec], eps=1e-8, near_zero=True, linf=True, structured=True)
    row = dict(zip(COLUMNS, table[1].tolist(), strict=True))
    assert row["zeros"] == int((conv == 0).sum()) == 2 * 12 + 6 * 4 - 2 * 4 + 1
    assert row["numel"] == conv.numel() and (row["rows"], row["cols"]) == (6, 3)
    assert (row["dead_rows"], row["dead_cols"]) == (2, 1)
    assert table[2].tolist()[COLUMNS.index("near_zero")] == 3  # two zeros and 5e-9
    assert table.dtype == torch.float64 and table.shape == (3, len(COLUMNS))


def test_optional_columns_stay_zero_and_figures_follow_the_extras():
    tensors = hand_built()
    plain = partial_sums(tensors)
    for col in ("near_zero", "max_abs", "dead_rows", "dead_cols", "rows", "cols"):
        assert plain[:, COLUMNS.index(col)].abs().sum() == 0
    assert figures(plain).shape == (3, 3)
    assert figure_names(["linf"]) == ("l1", "l2", "sparsity", "linf")


def test_global_sparsity_is_total_zeros_over_total_elements():
    tensors = hand_built()
    zeros = sum(int((t == 0).sum()) for t in tensors)
    total = sum(t.numel() for t in tensors)
    assert global_sparsity(partial_sums(tensors)).item() == zeros / total


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_weights_accumulate_in_float32(dtype):
    w = torch.linspace(-1, 1, 4001, dtype=torch.float64)
    w[::7] = 0
    low = w.to(dtype)
    l1, l2, sparsity = figures(partial_sums([low])).tolist()[0]
    exact = low.double()
    assert l1 == pytest.approx(torch.linalg.vector_norm(exact, 1).item(), rel=1e-6)
    assert l2 == pytest.approx(torch.linalg.vector_norm(exact, 2).item(), rel=1e-6)
    assert sparsity == int((low == 0).sum()) / low.numel()


def test_empty_and_scalar_tensors():
    table = partial_sums([torch.zeros(0, 3), torch.tensor(2.0)], linf=True, structured=True)
    assert table[0].tolist() == [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 3.0, 0.0, 3.0]  # columns of nothing: vacuously zero
    assert table[1, COLUMNS.index("max_abs")].item() == 2.0
    assert partial_sums([]).shape == (0, len(COLUMNS))


def test_no_autograd_and_parameters_untouched():
    p = torch.nn.Parameter(torch.tensor([[0.0, -1.5], [2.0, 0.0]]))
    before = p.detach().clone()
    table = partial_sums([p], near_zero=True, linf=True, structured=True)
    assert not table.requires_grad and torch.equal(p.detach(), before)


def test_sparsity_report_rows_and_printed_table(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # rich wraps at the terminal width
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3), torch.nn.Conv2d(3, 2, 2))
    with torch.no_grad():
        model[0].weight[1] = 0
        model[0].weight[:, 3] = 0
    rows = sparsity_report(model)
    assert [r["name"] for r in rows] == ["0.weight", "2.weight"]
    w = model[0].weight.detach()
    first = rows[0]
    assert first["shape"] == (3, 4) and first["numel"] == 12
    assert first["l1"] == pytest.approx(torch.linalg.vector_norm(w, 1).item(), rel=1e-6)
    assert first["l2"] == pytest.approx(torch.linalg.vector_norm(w, 2).item(), rel=1e-6)
    assert first["sparsity"] == int((w == 0).sum()) / 12 == 6 / 12
    assert (first["dead_rows"], first["dead_cols"]) == (1 / 3, 1 / 4)
    # the counts are exact integers, counted independently of the fractions
    dead_rows = sum(bool((w[i] == 0).all()) for i in range(3))
    dead_cols = sum(bool((w[:, j] == 0).all()) for j in range(4))
    assert (first["zeros"], first["dead_row_count"], first["dead_col_count"]) == (6, dead_rows, dead_cols) == (6, 1, 1)
    conv = model[2].weight.detach()
    assert rows[1]["zeros"] == int((conv == 0).sum()) and isinstance(rows[1]["zeros"], int)
    biases = sparsity_report(model, include="*.bias", exclude="1.*")
    assert [r["name"] for r in biases] == ["0.bias", "2.bias"]
    assert biases[0]["dead_rows"] is None and biases[0]["dead_cols"] is None
    assert biases[0]["dead_row_count"] is None and biases[0]["dead_col_count"] is None
    print_report(rows + biases)
    out = capsys.readouterr().out
    assert "0.weight" in out and "33.3% (1/3)" in out and "25.0% (1/4)" in out and "total" in out
    with pytest.raises(ValueError, match="include pattern 'nope'"):
        sparsity_report(model, include="nope")


def test_nan_counts_as_non_zero_like_count_nonzero():
    w = torch.tensor([[float("nan"), 0.0], [0.0, 1.0]])
    row = dict(zip(COLUMNS, partial_sums([w], structured=True).tolist()[0], strict=True))
    assert row["zeros"] == w.numel() - torch.count_nonzero(w).item() == 2
    assert (row["dead_rows"], row["dead_cols"]) == (0, 0)


def test_one_scratch_buffer_serves_tensors_of_several_shapes_and_dtypes():
    g = torch.Generator().manual_seed(1)
    tensors = [torch.randn(7, 3, generator=g), torch.randn(2, 40, generator=g).double(), torch.randn(5, 2, generator=g)]
    tensors[0][2] = 0
    tensors[2][:, 1] = 0
    together = partial_sums(tensors, near_zero=True, linf=True, structured=True)
    alone = torch.cat([partial_sums([t], near_zero=True, linf=True, structured=True) for t in tensors])
    assert torch.equal(together, alone)
    assert together[0, COLUMNS.index("dead_rows")] == 1 and together[2, COLUMNS.index("dead_cols")] == 1
