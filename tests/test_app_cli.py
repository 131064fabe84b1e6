"""``lightreg-train`` as a user runs it: the command line's exit statuses and messages, sweeps with W&B, several
processes, SIGTERM, start-up without torch, and the installed package."""

from __future__ import annotations

import json
import os
import runpy
import signal
import subprocess
import sys
import zipfile

import pytest
from omegaconf import OmegaConf

from tests._app import COMMAND, FAST, NO_LOGGING, ROOT, app_env, run_main
from tests._readers import wandb_run


def test_two_job_multirun_with_wandb_and_the_sweep_plot(tmp_path, monkeypatch, capsys, fresh_hydra):
    sweep = tmp_path / "sweep"
    status = run_main(["-m", "model=linear", "data=breast_cancer", "penalty=l1", "penalty.log10_alpha=-3,-1",
                       f"hydra.sweep.dir={sweep}", *FAST, *NO_LOGGING], monkeypatch)
    assert status == 0, capsys.readouterr().err[-3000:]
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
        # The per-layer figures of the WeightMonitor and the Regularizer's metrics are in the run's history.
        assert {"weights/net.0.weight/l1", "weights/net.0.weight/l2", "weights/net.0.weight/sparsity",
                "weights/global/sparsity", "reg/l1/penalty", "reg/l1/alpha", "val/acc"} <= run["history"]
        assert run["config"]["penalty"]["alpha"] == pytest.approx(alpha)  # the resolved config
        assert run["summary"]["weights/global/sparsity"] == metrics["weights/global/sparsity"]
        assert "penalty:l1" in run["run"].tags and run["run"].job_type == "sweep"
        assert run["exit"].exit_code == 0
    assert runs[0]["run"].run_id != runs[1]["run"].run_id
    assert runs[0]["run"].run_group == runs[1]["run"].run_group == f"sweep-{sweep.parent.name}-{sweep.name}"
    assert runs[0]["run"].display_name.startswith("0:") and "log10_alpha=-3" in runs[0]["run"].display_name
    # A stronger L1 leaves more exact zeros.
    sparsity = [json.loads((j / "metrics.json").read_text())["weights/global/sparsity"] for j in jobs]
    assert sparsity[1] > sparsity[0]

    png = tmp_path / "sweep.png"
    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", ["plot_sweep.py", str(sweep), "-o", str(png)])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(ROOT / "scripts" / "plot_sweep.py"), run_name="__main__")
    assert done.value.code == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("l1 ")]
    assert [(r[1], float(r[3])) for r in rows] == [("0.001", pytest.approx(sparsity[0], abs=1e-3)),
                                                  ("0.1", pytest.approx(sparsity[1], abs=1e-3))]


@pytest.mark.slow
def test_a_sweep_over_target_sparsity_reaches_each_target_and_is_drawn_against_sparsity(tmp_path):
    sweep = tmp_path / "sweep"
    result = subprocess.run([*COMMAND, "-m", "model=mlp", "model.optimizer=adamw", "model.lr=0.01", "penalty=l0,l1",
                             "penalty.target_sparsity=0.5,0.9", "logger=none", "callbacks.monitor.extras=[]",
                             f"hydra.sweep.dir={sweep}", *FAST], capture_output=True, text=True, env=app_env(), timeout=600)
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
        # The fit-start line names the penalty as used: the target sets alpha, the configured one is not shown.
        assert f"{name.upper()}(alpha=set by the target)" in (job / "train.log").read_text()
    png = tmp_path / "targets.png"
    plot = subprocess.run([sys.executable, str(ROOT / "scripts" / "plot_sweep.py"), str(sweep), "-o", str(png)],
                          capture_output=True, text=True, timeout=120)
    assert plot.returncode == 0, plot.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    rows = [line.split() for line in plot.stdout.splitlines() if line.startswith(("l0 ", "l1 "))]
    assert sorted((r[0], r[1]) for r in rows) == [("l0", "0.5"), ("l0", "0.9"), ("l1", "0.5"), ("l1", "0.9")]



#: (argv, the message): every one is a configuration error, exit status 2, one line. The first group is found before
#: torch loads (test_config_errors_do_not_import_torch runs them again in a fresh process); the last needs the model.
PREFLIGHT_ERRORS = [
    (["penalty=l3"], "penalty=l3 is not an option of penalty (valid: coupled_group_l0, coupled_group_lasso, elastic_net, group_lasso, l0, l1, l2, none)"),
    (["model.foo=3"], "model.foo is not a key of model (valid: _target_, activation, depth"),
    (["+foo=1"], "foo is not a key of the config (valid: callbacks, data, experiment"),
    (["+model.foo=3"], "model.foo is not an argument of MLP (it takes activation"),
    (["penalty.alpha=-0.5"], "penalty.alpha must be in [0.0, inf], got -0.5"),
    (["penalty.alpha=???"], "Missing mandatory value: alpha"),
    (["penalty=l0", "penalty.target_sparsity=-0.1"], "penalty.target_sparsity must be in (0, 1), got -0.1"),
    (["penalty=l0", "penalty.target_sparsity=1.5"], "penalty.target_sparsity must be in (0, 1), got 1.5"),
    (["penalty=l1", "penalty.target_sparsity=0.5", "penalty.target_every=0"], "penalty.target_every must be >= 1, got 0"),
    (["callbacks=[default,nope]"], "callbacks=nope is not an option of callbacks (valid: checkpoint, default, early_stopping, freeze_zeros, monitor, none)"),
    (["+penalty.mode=gradient"], "penalty.mode is already a key of the config: set it without the +"),
    (["penalty=l2", "penalty.target_sparsity=0.5"], "needs mode='proximal' and a penalty whose prox makes zeros"),
    (["penalty=l0", "penalty.mode=gradient"], "L0(alpha=0.0001) has no gradient: it works only with mode='proximal'"),
    (["penalty.mode=fast"], "penalty.mode must be one of ('gradient', 'decoupled', 'proximal'), got 'fast'"),
    (["trainer.max_epochs=abc"], "trainer.max_epochs must be int or null, got 'abc'"),
    (["+trainer.max_epoch=3"], "trainer.max_epoch is not an argument of Trainer (did you mean max_epochs"),
    (["trainer.precision=33"], "trainer.precision must be one of"),
    (["data.batch_size=many"], "data.batch_size must be int or null, got 'many'"),
    (["model.lr=fast"], "model.lr must be float, got 'fast'"),
    (["model.momentum=1.5"], "momentum must be in [0, 1), got 1.5"),
    (["callbacks.checkpoint.mode=3"], "callbacks.checkpoint.mode must be str, got 3"),
    (["strategy=ddp_cpu", "strategy.start_method=fork2"], "strategy.start_method must be one of 'popen'"),
    (["-m", "strategy=ddp_cpu", "penalty.alpha=0.1,0.2"], "re-runs the whole sweep"),
]


@pytest.mark.parametrize("args, expected", [*PREFLIGHT_ERRORS, (["penalty.include=[encoder.*]"],
                                            "include pattern 'encoder.*' matches no parameter name")])
def test_bad_input_gives_a_short_message_and_starts_nothing(args, expected, tmp_path, monkeypatch, capfd, fresh_hydra):
    """In process (the console script's own ``main``), so each case costs no interpreter start."""
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    code = run_main([*args, f"hydra.run.dir={tmp_path}/run", f"hydra.sweep.dir={tmp_path}/sweep", *NO_LOGGING],
                    monkeypatch)
    out, err = capfd.readouterr()
    assert code == 2, err
    assert expected in err
    assert err.startswith("lightreg-train: error: ") and "Traceback" not in err and len(err.strip().splitlines()) <= 2, err
    assert "Sanity" not in out + err and "epoch=" not in out + err  # no training step ran
    assert not list(tmp_path.rglob("metrics.json"))
    assert not list(tmp_path.rglob("offline-run-*"))  # refused before the W&B run (default logger) started


def test_a_failure_inside_training_keeps_its_traceback(tmp_path, monkeypatch, capfd, fresh_hydra):
    """Only configuration errors are one line: a ValueError raised by the model during fit is a bug to see."""
    from lightreg.app.models import TaskModel

    def broken_step(self, batch, batch_idx):
        raise ValueError("a bug in training_step")

    monkeypatch.setattr(TaskModel, "training_step", broken_step)
    code = run_main(["model=linear", f"hydra.run.dir={tmp_path}", *FAST, *NO_LOGGING], monkeypatch)
    assert code == 1
    err = capfd.readouterr().err
    assert "Traceback" in err and "ValueError: a bug in training_step" in err and "lightreg-train: error" not in err
    assert not (tmp_path / "metrics.json").exists()
    assert wandb_run(tmp_path)["exit"].exit_code == 1  # the W&B run was finished, as failed


def test_in_process_hydra_runs_leave_no_global_state(tmp_path, monkeypatch, capfd, fresh_hydra):
    """The guard for the tests above: Lightning must not think a later test runs under Hydra."""
    import logging

    from hydra.core.hydra_config import HydraConfig

    handlers = list(logging.getLogger().handlers)
    assert run_main(["penalty.alpha=-1", f"hydra.run.dir={tmp_path}", *NO_LOGGING], monkeypatch) == 2
    assert not HydraConfig.initialized()
    assert not logging.getLogger("lightning.pytorch").disabled
    assert logging.getLogger().handlers == handlers


def test_python_dash_m_lightreg_prints_the_composed_config(monkeypatch, capsys, fresh_hydra):
    monkeypatch.setattr(sys, "argv", ["lightreg", "--cfg", "job", "penalty=l1", "penalty.log10_alpha=-2", *NO_LOGGING])
    runpy.run_module("lightreg", run_name="__main__")  # what `python -m lightreg` runs
    cfg = OmegaConf.create(capsys.readouterr().out)
    assert cfg.penalty._target_ == "lightreg.L1" and cfg.model._target_ == "lightreg.app.models.MLP"
    assert cfg.penalty.log10_alpha == -2


START_UP = """
import json, sys, time
from hydra.core.global_hydra import GlobalHydra
from lightreg.app.cli import main
seconds, cases, out = {}, json.loads(sys.argv[1]), sys.argv[2]
for argv in [["--help"], ["--cfg", "job"], *cases]:
    sys.argv = ["lightreg-train", *argv, "hydra.run.dir=" + out, "hydra.sweep.dir=" + out]
    start = time.perf_counter()
    try:
        main()
    except SystemExit:
        pass
    seconds[" ".join(argv)] = time.perf_counter() - start
    GlobalHydra.instance().clear()
print("SECONDS", json.dumps(seconds))
print("HEAVY", sorted(m for m in ("torch", "lightning", "wandb", "sklearn", "matplotlib") if m in sys.modules))
"""


def test_help_cfg_and_config_errors_do_not_import_torch(tmp_path):
    """Every error of PREFLIGHT_ERRORS in one fresh process: answered, and torch, Lightning and wandb never loaded
    (what makes them take about a second, not the 6-7 s of a run's imports)."""
    argv = json.dumps([args for args, _ in PREFLIGHT_ERRORS])
    result = subprocess.run([sys.executable, "-c", START_UP, argv, str(tmp_path)], capture_output=True, text=True,
                            env=app_env(), timeout=300)
    assert "== Configuration groups ==" in result.stdout and "_target_: lightreg.app.models.MLP" in result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("lightreg-train: error: ")]
    assert len(errors) == len(PREFLIGHT_ERRORS), result.stderr[-3000:]
    for line, (_, expected) in zip(errors, PREFLIGHT_ERRORS, strict=True):
        assert expected in line
    assert result.stdout.strip().splitlines()[-1] == "HEAVY []"
    assert not list(tmp_path.rglob("metrics.json"))


def test_the_app_without_its_extra_says_what_to_install():
    code = "import sys; sys.modules['hydra'] = None; from lightreg.app.cli import main; main()"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=app_env(), timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip() == ("lightreg-train: error: the app needs packages that are not installed (hydra): "
                                     "pip install 'lightreg[app]'")
    plot = ("import runpy, sys; sys.modules['matplotlib'] = None; sys.argv = ['plot_sweep.py', '.']; "
            f"runpy.run_path({str(ROOT / 'scripts' / 'plot_sweep.py')!r}, run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", plot], capture_output=True, text=True, env=app_env(), timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip() == "plot_sweep.py needs matplotlib, part of the app's extra: pip install 'lightreg[app]'"


def _wait_for_line(process: subprocess.Popen, text: str) -> list[str]:
    lines = []
    for line in process.stdout:
        lines.append(line)
        if text in line:
            return lines
    raise AssertionError(f"{text!r} never printed; stderr: {process.stderr.read()[-3000:]}")


@pytest.mark.slow
def test_sigterm_stops_a_run_and_a_sweep_with_status_143(tmp_path):
    """A real SIGTERM to a real process, once training prints its epochs: exit status 143, the W&B run finished as
    failed, no metrics.json; in a sweep the next job never starts."""
    long = ["model=linear", "data=diabetes", "trainer.max_epochs=2000", "callbacks=monitor"]  # ~20 s
    starts = {
        "single": [*long, f"hydra.run.dir={tmp_path}/single"],
        "sweep": ["-m", *long, "logger=csv", "penalty.alpha=0.1,0.2", f"hydra.sweep.dir={tmp_path}/sweep"],
    }
    procs = {name: subprocess.Popen([*COMMAND, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    env=app_env()) for name, args in starts.items()}
    try:
        for process in procs.values():
            _wait_for_line(process, "epoch=")  # off a terminal: one progress line per epoch interval
            process.send_signal(signal.SIGTERM)
        codes = {name: process.wait(timeout=120) for name, process in procs.items()}
    finally:
        for process in procs.values():
            process.kill()
    assert codes == {"single": 143, "sweep": 143}
    assert "stopped by SIGTERM" in procs["single"].stderr.read()
    assert not list(tmp_path.rglob("metrics.json"))
    assert wandb_run(tmp_path / "single")["exit"].exit_code == 143  # marked failed
    assert sorted(p.name for p in (tmp_path / "sweep").iterdir() if p.is_dir()) == ["0"]  # job 1 never started


def test_optuna_search_runs_trials_and_reports_the_best(tmp_path, monkeypatch, capsys, fresh_hydra):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    sweep = tmp_path / "optuna"
    status = run_main(["hparams_search=optuna", "hydra.sweeper.n_trials=2", "logger=none", "report=false",
                       f"hydra.sweep.dir={sweep}", *FAST, *NO_LOGGING], monkeypatch)
    assert status == 0, capsys.readouterr().err[-3000:]
    values = [json.loads((sweep / j / "metrics.json").read_text())["val/acc"] for j in ("0", "1")]
    best = OmegaConf.load(sweep / "optimization_results.yaml")
    assert best.best_value == pytest.approx(max(values))
    assert 1e-6 <= best.best_params["penalty.alpha"] <= 1e-1


def test_a_wheel_ships_conf_and_finds_it_when_installed(tmp_path):
    """Build the wheel from a copy of the sources (the checkout gets no build/ folder) with the setuptools at hand,
    unpack it as an installer would, and ask the installed app where its configs are."""
    setuptools = pytest.importorskip("setuptools")
    if int(setuptools.__version__.split(".")[0]) < 68:
        pytest.skip(f"pyproject.toml builds with setuptools >= 68; this environment has {setuptools.__version__}")
    import shutil

    had_build = (ROOT / "build").exists()
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for folder in ("lightreg", "conf"):
        shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    build = ("import sys; from setuptools import build_meta; "
             "print(build_meta.build_wheel(sys.argv[1]))")
    result = subprocess.run([sys.executable, "-c", build, str(tmp_path / "dist")], cwd=source, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    wheel = tmp_path / "dist" / result.stdout.strip().splitlines()[-1]
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    conf = ROOT / "conf"
    installed = site / "lightreg" / "conf"
    assert {p.relative_to(conf) for p in conf.rglob("*.yaml")} == {p.relative_to(installed) for p in installed.rglob("*.yaml")}
    entry_points = next(site.glob("lightreg-*.dist-info")) / "entry_points.txt"
    assert "lightreg-train = lightreg.app.cli:main" in entry_points.read_text()
    # Run from the install, outside the checkout: the app must find the installed copy.
    found = subprocess.run([sys.executable, "-c", "from lightreg.app.config import config_dir; print(config_dir())"],
                           capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(site)})
    assert found.stdout.strip() == str(installed), found.stderr
    assert (ROOT / "build").exists() == had_build  # nothing written into the checkout
