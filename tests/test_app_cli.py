"""``lightreg-train`` end to end, as a user runs it: subprocesses of the console script."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from wandb.proto import wandb_internal_pb2

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
FAST = ["trainer=debug", "monitor.every_n_steps=2", "progress_bar=false", "checkpoint.enabled=false"]


def lightreg_train(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "PYTHONWARNINGS": "ignore"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([str(BIN / "lightreg-train"), *args], capture_output=True, text=True, env=env, timeout=timeout)


def wandb_records(run_dir: Path) -> list[wandb_internal_pb2.Record]:
    """Decode an offline ``run-<id>.wandb`` file: LevelDB-log framing (32 KiB blocks, 7-byte chunk headers)."""
    (path,) = run_dir.glob("run-*.wandb")
    raw = path.read_bytes()
    assert raw[:4] == b":W&B"
    records, pending, pos, block = [], b"", 7, 32768
    while pos + 7 <= len(raw):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        pending += raw[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST chunk: a record is complete
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def wandb_run(job_dir: Path) -> dict:
    """The run record, history keys and config of the single offline W&B run in ``job_dir``."""
    (run_dir,) = (job_dir / "wandb").glob("offline-run-*")
    out = {"history": set(), "config": {}, "dir": run_dir}
    for record in wandb_records(run_dir):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out["run"] = record.run
        elif kind == "history":
            out["history"] |= {item.key or "/".join(item.nested_key) for item in record.history.item}
        elif kind == "config":
            out["config"].update({item.key: json.loads(item.value_json) for item in record.config.update})
    return out


@pytest.mark.slow
def test_two_job_multirun_with_wandb_and_the_sweep_plot(tmp_path):
    sweep = tmp_path / "sweep"
    result = lightreg_train("-m", "model=linear", "data=breast_cancer", "penalty=l1", "penalty.log10_alpha=-3,-1",
                            f"hydra.sweep.dir={sweep}", *FAST)
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name for p in jobs] == ["0", "1"]
    runs = []
    for job, alpha in zip(jobs, (1e-3, 1e-1), strict=True):
        metrics = json.loads((job / "metrics.json").read_text())
        assert {"val/acc", "test/acc", "weights/global/sparsity", "reg/l1/alpha"} <= set(metrics)
        assert metrics["reg/l1/alpha"] == pytest.approx(alpha)
        assert OmegaConf.load(job / ".hydra" / "config.yaml").penalty.log10_alpha in (-3, -1)
        run = wandb_run(job)  # one offline W&B run per job: each was finished before the next began
        runs.append(run)
        assert f"wandb sync {run['dir']}" in result.stdout
        # The per-layer figures of the WeightMonitor and the Regularizer's metrics are in the run's history.
        assert {"weights/net.0.weight/l1", "weights/net.0.weight/l2", "weights/net.0.weight/sparsity",
                "weights/global/sparsity", "reg/l1/penalty", "reg/l1/alpha", "val/acc"} <= run["history"]
        assert run["config"]["penalty"]["alpha"] == pytest.approx(alpha)  # the resolved config
        assert "penalty:l1" in run["run"].tags and run["run"].job_type == "sweep"
    assert runs[0]["run"].run_id != runs[1]["run"].run_id
    assert runs[0]["run"].run_group == runs[1]["run"].run_group == f"sweep-{sweep.parent.name}-{sweep.name}"
    assert runs[0]["run"].display_name.startswith("0:") and "log10_alpha=-3" in runs[0]["run"].display_name
    # A stronger L1 leaves more exact zeros.
    sparsity = [json.loads((j / "metrics.json").read_text())["weights/global/sparsity"] for j in jobs]
    assert sparsity[1] > sparsity[0]

    png = tmp_path / "sweep.png"
    plot = subprocess.run([sys.executable, str(ROOT / "scripts" / "plot_sweep.py"), str(sweep), "-o", str(png)],
                          capture_output=True, text=True, timeout=120)
    assert plot.returncode == 0, plot.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    rows = [line.split() for line in plot.stdout.splitlines() if line.startswith("l1 ")]
    assert [(r[1], float(r[3])) for r in rows] == [("0.001", pytest.approx(sparsity[0], abs=1e-3)),
                                                  ("0.1", pytest.approx(sparsity[1], abs=1e-3))]


@pytest.mark.slow
def test_a_sweep_over_target_sparsity_reaches_each_target_and_is_drawn_against_sparsity(tmp_path):
    sweep = tmp_path / "sweep"
    result = lightreg_train("-m", "model=mlp", "model.optimizer=adamw", "model.lr=0.01", "penalty=l0,l1",
                            "penalty.target_sparsity=0.5,0.9", "logger=none", "monitor.extras=[]",
                            f"hydra.sweep.dir={sweep}", *FAST)
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert len(jobs) == 4
    for job in jobs:
        cfg, metrics = OmegaConf.load(job / ".hydra" / "config.yaml"), json.loads((job / "metrics.json").read_text())
        name = cfg.penalty._target_.rsplit(".", 1)[-1].lower()
        assert metrics[f"reg/{name}/target"] == cfg.penalty.target_sparsity
        # The head is selected too: the global figure of the monitor is the Regularizer's.
        assert metrics[f"reg/{name}/sparsity"] == pytest.approx(cfg.penalty.target_sparsity, abs=1e-3)
        assert metrics["weights/global/sparsity"] == pytest.approx(metrics[f"reg/{name}/sparsity"], abs=1e-6)
    png = tmp_path / "targets.png"
    plot = subprocess.run([sys.executable, str(ROOT / "scripts" / "plot_sweep.py"), str(sweep), "-o", str(png)],
                          capture_output=True, text=True, timeout=120)
    assert plot.returncode == 0, plot.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    rows = [line.split() for line in plot.stdout.splitlines() if line.startswith(("l0 ", "l1 "))]
    assert sorted((r[0], r[1]) for r in rows) == [("l0", "0.5"), ("l0", "0.9"), ("l1", "0.5"), ("l1", "0.9")]


@pytest.fixture
def fresh_hydra():
    """Run ``@hydra.main`` in this process, then undo its global state so later tests (Lightning's launchers
    look at ``HydraConfig``, caplog at the loggers) see a process that never ran Hydra."""
    import logging

    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    root = logging.getLogger()
    saved = (root.level, list(root.handlers))
    GlobalHydra.instance().clear()
    yield
    GlobalHydra.instance().clear()
    HydraConfig.instance().cfg = None
    root.setLevel(saved[0])
    root.handlers[:] = saved[1]


@pytest.mark.parametrize("args, expected", [
    (["penalty=l3"], "Could not find 'penalty/l3'"),
    (["penalty.alpha=-0.5"], "alpha must be in [0.0, inf], got -0.5"),
    (["penalty.alpha=???"], "Missing mandatory value: alpha"),
    (["-m", "strategy=ddp_cpu", "penalty.alpha=0.1,0.2"], "re-runs the whole sweep"),
    (["penalty.include=[encoder.*]"], "include pattern 'encoder.*' matches no parameter name"),
])
def test_bad_input_gives_a_short_message_and_no_metrics(args, expected, tmp_path, monkeypatch, capfd, fresh_hydra):
    """In process (the console script's own ``main``), so each case costs no interpreter start."""
    from lightreg.app.train import main

    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    monkeypatch.setattr(sys, "argv", ["lightreg-train", *args, f"hydra.run.dir={tmp_path}/run",
                                      f"hydra.sweep.dir={tmp_path}/sweep",
                                      # Leave logging alone: Hydra's configs would rebind or disable loggers.
                                      "hydra/job_logging=none", "hydra/hydra_logging=none"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code not in (0, None)
    stderr = capfd.readouterr().err
    assert expected in stderr
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) <= 15, stderr
    assert not list(tmp_path.rglob("metrics.json"))
    assert not list(tmp_path.rglob("offline-run-*"))  # refused before the W&B run (default logger) started


def test_in_process_hydra_runs_leave_no_global_state(tmp_path, monkeypatch, capfd, fresh_hydra):
    """The guard for the test above: Lightning must not think a later test runs under Hydra."""
    import logging

    from hydra.core.hydra_config import HydraConfig

    from lightreg.app.train import main

    handlers = list(logging.getLogger().handlers)
    monkeypatch.setattr(sys, "argv", ["lightreg-train", "penalty.alpha=-1", f"hydra.run.dir={tmp_path}",
                                      "hydra/job_logging=none", "hydra/hydra_logging=none"])
    with pytest.raises(SystemExit):
        main()
    assert not HydraConfig.initialized()
    assert not logging.getLogger("lightning.pytorch").disabled
    assert logging.getLogger().handlers == handlers


@pytest.mark.slow
def test_ddp_cpu_and_fsdp2_cpu_end_to_end_agree(tmp_path):
    results = {}
    for strategy in ("ddp_cpu", "fsdp2_cpu"):
        out = tmp_path / strategy
        result = lightreg_train(f"strategy={strategy}", "logger=csv", f"hydra.run.dir={out}", *FAST)
        assert result.returncode == 0, result.stderr[-3000:]
        assert (out / "train_ddp_process_1.log").is_file()  # rank 1 re-ran the same single job, not a sweep
        results[strategy] = json.loads((out / "metrics.json").read_text())
    ddp, fsdp2 = results["ddp_cpu"], results["fsdp2_cpu"]
    assert ddp["trainer/global_step"] == 6.0  # 2 epochs x 3 batches, each rank on its half of every batch
    assert ddp["weights/global/sparsity"] > 0
    # Sharded (DTensor) or replicated parameters: the same training, the same final figures.
    for key in ("val/loss", "test/loss", "weights/global/sparsity", "weights/net.0.weight/sparsity", "trainer/global_step"):
        assert fsdp2[key] == pytest.approx(ddp[key], rel=1e-4, abs=1e-6), key


@pytest.mark.slow
def test_ddp_spawn_in_a_multirun(tmp_path):
    sweep = tmp_path / "sweep"
    result = lightreg_train("-m", "strategy=ddp_cpu", "strategy.start_method=spawn", "model=linear",
                            "data=diabetes", "penalty=l1", "penalty.alpha=0.05", f"hydra.sweep.dir={sweep}", *FAST)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("Launching 1 jobs locally") == 1  # the sweep ran once, not once per rank
    for job in ("0",):
        metrics = json.loads((sweep / job / "metrics.json").read_text())
        assert {"val/mse", "test/r2", "weights/global/sparsity"} <= set(metrics)
        assert "reg/l1/penalty" in wandb_run(sweep / job)["history"]


def test_python_dash_m_lightreg_prints_the_composed_config(monkeypatch, capsys, fresh_hydra):
    import runpy

    monkeypatch.setattr(sys, "argv", ["lightreg", "--cfg", "job", "penalty=l1", "penalty.log10_alpha=-2",
                                      "hydra/job_logging=none", "hydra/hydra_logging=none"])
    runpy.run_module("lightreg", run_name="__main__")  # what `python -m lightreg` runs
    cfg = OmegaConf.create(capsys.readouterr().out)
    assert cfg.penalty._target_ == "lightreg.L1" and cfg.model._target_ == "lightreg.app.models.MLP"
    assert cfg.penalty.log10_alpha == -2


@pytest.mark.slow
def test_optuna_search_runs_trials_and_reports_the_best(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    sweep = tmp_path / "optuna"
    result = lightreg_train("hparams_search=optuna", "hydra.sweeper.n_trials=2", "logger=none", "report=false",
                            f"hydra.sweep.dir={sweep}", *FAST)
    assert result.returncode == 0, result.stderr[-3000:]
    values = [json.loads((sweep / j / "metrics.json").read_text())["val/acc"] for j in ("0", "1")]
    best = OmegaConf.load(sweep / "optimization_results.yaml")
    assert best.best_value == pytest.approx(max(values))
    assert 1e-6 <= best.best_params["penalty.alpha"] <= 1e-1


@pytest.mark.slow
def test_a_non_editable_install_ships_conf(tmp_path):
    site = tmp_path / "site"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                          "--target", str(site), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert pip.returncode == 0, pip.stderr[-3000:]
    conf = ROOT / "conf"
    assert {p.relative_to(conf) for p in conf.rglob("*.yaml")} == {
        p.relative_to(site / "lightreg" / "conf") for p in (site / "lightreg" / "conf").rglob("*.yaml")}
    # Run from the install, outside the checkout: the app must find the installed copy.
    found = subprocess.run([sys.executable, "-c", "from lightreg.app.config import config_dir; print(config_dir())"],
                           capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(site)})
    assert found.stdout.strip() == str(site / "lightreg" / "conf"), found.stderr
