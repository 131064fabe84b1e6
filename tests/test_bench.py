"""scripts/bench.py cannot rot: a --quick run end to end, and its measuring parts against known answers."""

from __future__ import annotations

import json
import logging
import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from tests._scripts import load_script


@pytest.fixture(scope="module")
def bench():
    return load_script("bench")


def test_memory_peak_counts_torch_allocations_exactly(bench):
    mib = 2**20
    with bench.MemoryWindow(torch.device("cpu")) as window:
        a = torch.empty(mib // 4)  # 1 MiB
        del a
        b, c = torch.empty(mib // 4), torch.empty(mib // 2)  # 1 + 2 MiB alive together
        del b, c
        d = torch.empty(mib // 8)  # 0.5 MiB, below the peak
        del d
    assert window.peak == 3 * mib


def test_mlp_is_the_benchmark_model(bench):
    net, x, y = bench.make_model("mlp", quick=False)
    sizes = [p.numel() for _, p in bench.select_parameters(net)]
    assert sum(sizes) == 12 * 512 * 512 + 512 * 10  # about 3 M penalised weights
    assert bench.largest_penalised_bytes("mlp", quick=False) == 512 * 512 * 4
    assert any(isinstance(m, torch.nn.LayerNorm) for m in net.modules())
    assert x.shape == (128, 512) and y.shape == (128,)


class _Nested(Callback):
    """Costs a known amount of the thread's CPU time per step, through a nested call."""

    calls = 0

    def on_train_batch_end(self, *args):
        self._work()

    def _work(self):
        type(self).calls += 1
        deadline = __import__("time").thread_time() + 0.004
        while __import__("time").thread_time() < deadline:
            pass


def test_interleaved_fit_times_each_configuration_on_its_own_steps(bench):
    """Two configurations share one fit; the busy callback runs, and is timed, only on its own steps."""
    plan = bench.make_plan(["none", "busy"], warmup=1, cycles=5)
    assert plan[0] == "none" and sorted(plan[1:]) == ["busy"] * 5 + ["none"] * 5
    probe = bench.Probe(plan=plan, first_timed=3)
    model = bench.BenchModule(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 10)), probe)
    data = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.randn(4 * len(plan), 4), torch.randint(0, 10, (4 * len(plan),))), batch_size=4)
    busy = bench.instrument(_Nested(), "busy", probe)
    trainer = pl.Trainer(max_steps=len(plan), logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[bench.StepTimer(probe), busy])
    trainer.fit(model, data)
    assert _Nested.calls == 5  # never on the plain steps
    timed = plan[3:]
    assert len(probe.steps["busy"]) == timed.count("busy") and len(probe.steps["none"]) == timed.count("none")
    # Thread CPU time of a 4 ms busy loop barely moves with load; twice that would mean _work counted twice.
    # Whole-step times are not compared: that would test the machine's load, not the script.
    for hook, step in zip(probe.hooks["busy"], probe.steps["busy"]):
        assert 0.004 <= hook < 0.008
        assert hook <= step
    assert probe.hooks["none"] == [0.0] * timed.count("none")


def test_quick_run_end_to_end(bench, tmp_path, capfd):
    """``main`` as the command line calls it, in this process (no second torch start-up); the process-wide settings
    it makes for a clean measurement (one torch thread, quiet Lightning, warning filters) are put back after."""
    out = tmp_path / "bench.json"
    threads, lightning_logger = torch.get_num_threads(), logging.getLogger("lightning.pytorch")
    level = lightning_logger.level
    try:
        with warnings.catch_warnings():
            bench.main(["--quick", "--eager", "--models", "mlp", "--json", str(out)])
    finally:
        torch.set_num_threads(threads)
        lightning_logger.setLevel(level)
    printed = capfd.readouterr()  # file descriptors 1 and 2: what the C++ profiler writes too
    assert "| l1/proximal |" in printed.out and "| target | met | measured |" in printed.out
    # The tables lead with the defaults, per optimizer: Adam, then SGD with momentum.
    assert "| mlp, Adam | `Regularizer(l1)` (default) |" in printed.out and "| mlp, SGD, momentum 0.9 |" in printed.out
    assert printed.out.index("### Defaults") < printed.out.index("### mlp ")
    assert "USDT" not in printed.out + printed.err  # the profiler's start/stop lines are silenced
    result = json.loads(out.read_text())
    rows = result["models"]["mlp"]["configs"]
    expected = {"none", "floor", "hand_l1_in_loss", "adam_weight_decay", "adamw"}
    expected |= {f"{p}/{m}" for p in ("l1", "l2", "elastic_net", "group_lasso") for m in ("gradient", "decoupled", "proximal")}
    expected |= {"l0/proximal", *bench.EXTRA_ROWS}
    expected |= {"monitor/every_step", "monitor/default"}
    assert expected == set(rows)
    assert rows["floor"]["x_floor"] == pytest.approx(1.0)
    assert rows["none"]["step_ratio"] == pytest.approx(1.0)
    base = rows["none"]["step_ms"]
    largest = result["models"]["mlp"]["largest_penalised_bytes"]
    for name, row in rows.items():
        assert row["step_ms"] > 0
        assert row["added_pct"] == pytest.approx(100 * row["added_ms"] / base)
        if name not in ("none", "hand_l1_in_loss", "adam_weight_decay", "adamw"):
            assert row["added_ms"] > 0, name
        if name.split("/")[0] in bench.PENALTIES:
            # The memory guard: no plain-step mode holds a temporary beyond the largest penalised tensor (a
            # few bytes of scalar bookkeeping aside); Adam's preconditioned prox adds its step t, one tensor; the target
            # adds the level histograms. Allocation sizes do not depend on timing: exact here.
            mode = name.split("/")[1]
            limit = largest + bench.SLACK_BYTES
            if mode in ("proximal", "proximal_eager") or mode.startswith("target"):
                limit += largest + (bench.SELECTION_BYTES if mode.startswith("target") else 0)
            assert row["extra_hook_bytes"] <= limit, (name, row["extra_hook_bytes"], largest)
    assert {t[0] for t in result["targets"]} >= {"every plain-step Regularizer mode <= 5% of the MLP step",
                                                  "default prox with Adam <= 4x the floor (MLP)"}
    sgd = result["models"]["mlp/sgd"]["configs"]
    assert set(sgd) == {"none", "floor", "hand_l1_in_loss", *bench.default_rows()}
