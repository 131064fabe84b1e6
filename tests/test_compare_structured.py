"""scripts/compare_structured.py: its parameter count of a cut, and a smoke run as a user runs it."""

from __future__ import annotations

import json

import pytest
import torch

from tests._scripts import load_script, run_script

pytest.importorskip("torch_pruning")


@pytest.mark.parametrize("name", ["cnn", "resnet"])
def test_params_left_is_what_shrink_leaves(name):
    """Oracle: the parameter count of the model shrink builds after the same groups are zeroed."""
    script = load_script("compare_structured")
    torch.manual_seed(0)
    model, example = script.build(name).eval(), torch.randn(4, 64)
    families = script.coupled_groups(model, example).families
    dead = [set(range(0, f.units - 1, 3)) for f in families]
    with torch.no_grad():
        for f, units in zip(families, dead, strict=True):
            rows = torch.tensor(sorted(units), dtype=torch.long)
            for s in f.slices:
                s.param.index_fill_(s.dim, s.index[torch.isin(s.unit, rows)], 0.0)
    small = script.shrink(model, example)
    assert script.params_left(model, families, dead) == sum(p.numel() for p in small.parameters())


def test_parameter_budget_takes_the_fewest_groups_of_lowest_level_that_meet_it():
    """Oracle: the parameters of the model shrink builds with the k groups of lowest level zeroed (budget met), and
    with k - 1 (budget missed)."""
    script = load_script("compare_structured")
    torch.manual_seed(0)
    model, example = script.build("resnet").eval(), torch.randn(4, 64)
    penalty = script.L0Budget(model)
    penalty.bind(model, [(n, p) for n, p in model.named_parameters() if p.ndim >= 2], example)
    n = sum(f.units for f in penalty.groups.families)
    levels = torch.rand(n, generator=torch.Generator().manual_seed(1))
    k = penalty.groups_to_zero(levels, 0.6, n)

    def shrunk_params(count):
        net = script.copy.deepcopy(model)
        families = script.coupled_groups(net, example).families
        dead = torch.zeros(n, dtype=torch.bool)
        dead[levels.argsort()[:count]] = True
        with torch.no_grad():
            for f, d in zip(families, dead.split([f.units for f in families]), strict=True):
                for s in f.slices:
                    s.param.index_fill_(s.dim, s.index[d[s.unit]], 0.0)
        return sum(p.numel() for p in script.shrink(net, example).parameters())

    assert 0 < k < n and shrunk_params(k) <= 0.4 * penalty.total < shrunk_params(k - 1)


@pytest.mark.slow
def test_quick_run_writes_rows(tmp_path):
    result = run_script("compare_structured", "--quick", "--out", str(tmp_path / "rows.json"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert {r["method"] for r in rows} == {"dense", "lightreg", "lightreg-l0", "tp-groupnorm", "modelpruning"}
    assert all(r["cut_change"] < 1e-5 for r in rows if r["method"].startswith("lightreg"))  # the budget's zeros suffice
    assert all(r["reduction"] >= 0.5 for r in rows if r["method"] != "dense")
    assert "| cnn | 50% | lightreg |" in result.stdout
