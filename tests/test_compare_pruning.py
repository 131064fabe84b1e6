"""scripts/compare_pruning.py: its pruning schedule against the cubic formula, and a --quick run end to end."""

from __future__ import annotations

import json

import pytest

from tests._scripts import load_script, run_script


@pytest.fixture(scope="module")
def compare():
    return load_script("compare_pruning")


def test_pruning_amounts_compose_to_the_cubic_schedule(compare):
    """ModelPruning prunes a share of the weights still unpruned: the shares must compound to Zhu & Gupta's curve."""
    amount, sparsity = compare.cubic_amounts(0.9, ramp_epochs=20), 0.0
    for epoch in range(30):
        sparsity += amount(epoch) * (1 - sparsity)
        expected = 0.9 * (1 - (1 - min(epoch + 1, 20) / 20) ** 3)
        assert sparsity == pytest.approx(expected, abs=1e-12), epoch
    assert amount(20) == amount(29) == 0.0


@pytest.mark.slow
def test_quick_run_end_to_end(tmp_path):
    out = tmp_path / "quick"
    proc = run_script("compare_pruning", "--quick", "--out", str(out), cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| mlp | adamw | 0.8 | lightreg-l0 |" in proc.stdout
    result = json.loads(out.with_suffix(".json").read_text())
    rows = {r["method"]: r for r in result["rows"]}
    assert set(rows) == {"dense", "pruning", "lightreg-l1", "lightreg-l0"}
    assert rows["dense"]["sparsity_mean"] == 0.0
    for method in ("pruning", "lightreg-l1", "lightreg-l0"):  # every method reaches the target it was given
        assert rows[method]["sparsity_mean"] == pytest.approx(0.8, abs=1e-3), method
        assert 0.1 < rows[method]["acc_mean"] <= 1.0
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
