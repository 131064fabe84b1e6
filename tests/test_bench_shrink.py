"""scripts/bench_shrink.py cannot rot: its timer against known CPU costs, and a --quick run end to end."""

from __future__ import annotations

import json
import time

import pytest
import torch
from torch import nn

from tests._scripts import load_script, run_script


@pytest.fixture(scope="module")
def bench():
    return load_script("bench_shrink")


class Busy(nn.Module):
    """A forward that costs a known amount of the thread's CPU time."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds

    def forward(self, x):
        deadline = time.thread_time() + self.seconds
        while time.thread_time() < deadline:
            pass
        return x


def test_the_timer_measures_each_net_on_its_own_passes(bench):
    slow, fast = bench.median_forward_seconds([Busy(0.004), Busy(0.001)], torch.zeros(1), repeats=5)
    # Thread CPU time of a busy loop barely moves with load; twice the cost would mean a pass counted twice.
    assert 0.004 <= slow < 0.008 and 0.001 <= fast < 0.002


@pytest.mark.slow
def test_quick_run_end_to_end(tmp_path):
    out = tmp_path / "bench.json"
    proc = run_script("bench_shrink", "--quick", "--json", str(out), cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| model | params | units | forward, batch 256 |" in proc.stdout
    models = json.loads(out.read_text())["models"]
    assert set(models) == {"mlp", "cnn", "cnn, with_bias"}
    for name, row in models.items():
        assert row["params_after"] <= row["params_before"], name
        assert row["acc_shrunk"] == row["acc"] and row["max_abs_diff"] <= 1e-5, name
        assert row["us_before"] > 0 and row["us_after"] > 0
        assert row["speedup"] == pytest.approx(row["us_before"] / row["us_after"])
        assert f"| {name} | {row['params_before']:,} -> {row['params_after']:,}" in proc.stdout
    assert models["mlp"]["params_after"] < models["mlp"]["params_before"]  # the quick strength cuts units
