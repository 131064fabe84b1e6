"""``examples/``: a user's own LightningModule and DataModule in their own package and config dir, trained by the app.

The commands of ``examples/README.md`` run as written (with tiny sizes appended) in a copy of the folder: a run, a
two-job sweep with W&B offline, the plot. Around them, the other standard Hydra ways (``hydra.searchpath``, a
``_target_`` override on the command line), a configuration error read from the user's own source without torch,
``shrink`` of the user's submodule, and the two multi-process strategies.
"""

from __future__ import annotations

import json
import math
import os
import runpy
import shutil
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from lightreg import load_shrunk

from tests._app import COMMAND, NO_LOGGING, ROOT, app_env, run_main
from tests._commands import commands, shorten_sweep
from tests._readers import wandb_run

README = (ROOT / "examples" / "README.md").read_text()
#: Tiny sizes: a few seconds per run.
TINY = ("data.n_train=128", "data.n_val=64", "data.n_test=64", "data.batch_size=32", "trainer.max_epochs=2",
        "model.d_model=8", "model.nhead=2", "model.layers=1", "model.feedforward=16", "model.hidden=16",
        "callbacks.monitor.every_n_steps=2", "progress_bar=false")


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A copy of examples/, as a user's own project folder, with the README's commands run in it once."""
    where = tmp_path_factory.mktemp("project") / "examples"
    shutil.copytree(ROOT / "examples", where, ignore=shutil.ignore_patterns("__pycache__", "outputs", "multirun"))
    return where


def _main(argv, where):
    """``lightreg-train ARGV`` in this process, from the folder ``where``."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(where)
        patch.setenv("WANDB_DIR", str(where))
        from hydra.core.global_hydra import GlobalHydra

        GlobalHydra.instance().clear()
        from hydra.core.hydra_config import HydraConfig

        status = run_main([*argv, *NO_LOGGING], patch)
        GlobalHydra.instance().clear()
        HydraConfig.instance().cfg = None  # later tests (Lightning's launchers) must see a process that never ran Hydra
    return status


@pytest.fixture(scope="module")
def readme_runs(project):
    """The README's commands in order: ``cd examples`` is the copy; runs and sweeps get TINY; the plot runs as is."""
    done = {"run": None, "sweep": None, "plot": None}
    for words in commands(README):
        if words[:2] == ["cd", "examples"]:
            continue
        if words[0] == "lightreg-train" and "-m" in words:
            args, sizes = zip(*(shorten_sweep(w) for w in words[1:]), strict=True)
            assert _main([*args, *TINY], project) == 0
            done["sweep"] = (project / words[-1].split("=", 1)[1], math.prod(sizes))
        elif words[0] == "lightreg-train":
            assert _main([*words[1:], "hydra.run.dir=outputs/run", *TINY], project) == 0
            done["run"] = project / "outputs" / "run"
        elif words[:2] == ["python", "../scripts/plot_sweep.py"]:
            with pytest.MonkeyPatch.context() as patch:
                patch.chdir(project)
                patch.setattr(sys, "argv", words[1:])
                with pytest.raises(SystemExit) as exited:
                    runpy.run_path(str(ROOT / "scripts" / "plot_sweep.py"), run_name="__main__")
            assert exited.value.code == 0
            done["plot"] = project / words[words.index("-o") + 1]
        else:
            raise AssertionError(f"examples/README.md has a command this test does not know: {words}")
    assert all(done.values()), done
    return done


def test_the_run_trains_the_users_model_with_the_penalty_monitor_and_checkpoints(readme_runs):
    out = readme_runs["run"]
    metrics = json.loads((out / "metrics.json").read_text())
    # The user's own metrics, the penalty's figures and the monitor's sparsity, together.
    assert {"val/accuracy", "test/accuracy", "val/loss", "reg/l1/penalty", "reg/l1/alpha", "weights/global/sparsity",
            "weights/head.0.weight/sparsity", "weights/encoder.layers.0.linear1.weight/sparsity"} <= set(metrics)
    assert metrics["reg/l1/alpha"] == 1e-3 and metrics["weights/global/sparsity"] > 0
    state = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    weights = {k: v for k, v in state.items() if v.ndim >= 2}  # the default selection: embeddings and matrices
    zeros = sum(int((v == 0).sum()) for v in weights.values())
    assert metrics["weights/global/sparsity"] == pytest.approx(zeros / sum(v.numel() for v in weights.values()), abs=1e-12)
    assert metrics["reg/l1/penalty"] == pytest.approx(1e-3 * sum(float(v.abs().sum()) for v in weights.values()), rel=1e-5)
    # The model's sizes came from the data's describe(); the best checkpoint is picked by the user's metric.
    hparams = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)["hyper_parameters"]
    assert (hparams["vocab_size"], hparams["seq_len"], hparams["num_classes"]) == (8, 16, 3)
    best = [p.name for p in (out / "checkpoints").glob("epoch=*.ckpt")]
    assert len(best) == 1
    run = wandb_run(out)
    assert {"val/accuracy", "reg/l1/penalty", "weights/global/sparsity"} <= run["history"]
    assert run["summary"]["val/accuracy"] == metrics["val/accuracy"] and "example" in run["run"].tags


def test_the_sweep_is_two_jobs_in_one_wandb_group_and_the_plot_draws_them(readme_runs):
    sweep, jobs = readme_runs["sweep"]
    assert jobs == 2
    dirs = sorted(p for p in sweep.iterdir() if p.is_dir() and (p / "metrics.json").exists())
    assert len(dirs) == 2
    alphas = [OmegaConf.load(d / ".hydra" / "config.yaml").penalty.alpha for d in dirs]
    assert alphas == [1e-4, pytest.approx(10 ** -3.5)]
    groups = set()
    for job, alpha in zip(dirs, alphas, strict=True):
        metrics = json.loads((job / "metrics.json").read_text())
        assert metrics["reg/l1/alpha"] == pytest.approx(alpha) and "val/accuracy" in metrics
        run = wandb_run(job)
        groups.add(run["run"].run_group)
        assert run["run"].job_type == "sweep" and run["exit"].exit_code == 0
    assert len(groups) == 1
    assert readme_runs["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_hydra_searchpath_a_target_override_and_the_data_contract_through_kwargs(project, tmp_path):
    """A subclass in another module of the user's, chosen by `_target_` on the command line: its own argument is
    checked (read from its source), the sizes reach the base through **kwargs."""
    (project / "userext.py").write_text(
        "from seqcls.model import SequenceClassifier\n\n\n"
        "class Deeper(SequenceClassifier):\n"
        "    def __init__(self, extra: int = 0, **kwargs) -> None:\n"
        "        super().__init__(**kwargs)\n"
        "        self.extra = extra\n")
    common = [f"hydra.searchpath=[file://{project}/conf]", "model=transformer", "data=sequences", "penalty=l1",
              "logger=csv", "callbacks=monitor", *TINY]
    assert _main([*common, "model._target_=userext.Deeper", "+model.extra=3", f"hydra.run.dir={tmp_path}/ok"], project) == 0
    assert "val/accuracy" in json.loads((tmp_path / "ok" / "metrics.json").read_text())
    # The case: data with neither describe() nor train_batches, the model's sizes written in its config.
    (project / "plaindata.py").write_text("from seqcls.data import SequenceData\n\n\nclass Plain(SequenceData):\n"
                                          "    describe = None\n")
    assert _main([*common, "data._target_=plaindata.Plain", "+model.vocab_size=8", "+model.seq_len=16",
                  "+model.num_classes=3", f"hydra.run.dir={tmp_path}/plain"], project) == 0
    assert "reg/l1/penalty" in json.loads((tmp_path / "plain" / "metrics.json").read_text())


@pytest.mark.slow
def test_a_sweep_over_target_sparsity_reaches_each_target_on_the_users_model(project, tmp_path):
    sweep = tmp_path / "targets"
    status = _main(["-m", "--config-dir", "conf", "experiment=sequences", "penalty=l0", "penalty.target_sparsity=0.5,0.8",
                    "logger=none", "callbacks=monitor", "callbacks.monitor.extras=[]", f"hydra.sweep.dir={sweep}", *TINY],
                   project)
    assert status == 0
    for job, target in (("0", 0.5), ("1", 0.8)):
        metrics = json.loads((sweep / job / "metrics.json").read_text())
        assert metrics["reg/l0/target"] == target
        assert metrics["reg/l0/sparsity"] == pytest.approx(target, abs=2e-3)  # the whole default selection
        assert metrics["weights/global/sparsity"] == pytest.approx(metrics["reg/l0/sparsity"], abs=1e-6)


def test_a_bad_key_of_the_users_model_is_one_line_before_anything_starts(project, tmp_path, capfd):
    status = _main(["--config-dir", "conf", "experiment=sequences", "+model.dmodel=8", f"hydra.run.dir={tmp_path}"], project)
    err = capfd.readouterr().err
    assert status == 2 and len(err.strip().splitlines()) == 1
    assert "model.dmodel is not an argument of SequenceClassifier (did you mean d_model?)" in err
    assert not list(tmp_path.rglob("metrics.json"))


def test_shrink_cuts_the_users_head_and_skips_a_model_without_the_submodule(project, tmp_path, capfd, caplog):
    base = ["--config-dir", "conf", "experiment=sequences", "logger=none", "penalty=group_lasso", "penalty.dim=0",
            "penalty.alpha=0.05", "penalty.include=[head.0.weight]", "shrink=true", *TINY]
    assert _main([*base, f"hydra.run.dir={tmp_path}/head"], project) == 0
    metrics = json.loads((tmp_path / "head" / "metrics.json").read_text())
    small, report = load_shrunk(tmp_path / "head" / "shrunk.pt2")  # torch.export: no pickled code
    assert report["rows"][0]["name"].startswith("head.") and metrics["shrink/params_after"] < metrics["shrink/params_before"]
    assert metrics["shrink/params_after"] == sum(p.numel() for p in small.parameters())
    assert metrics["shrink/max_abs_diff"] < 1e-5  # the same outputs, on the inputs the head saw during the test
    # A submodule shrink cannot cut (no nn.Sequential), and one the model does not have: skipped, saying why.
    sys.path.insert(0, str(project))
    try:
        from seqcls.model import SequenceClassifier
    finally:
        sys.path.remove(str(project))
    from lightreg.app.config import RunContext
    from lightreg.app.shrinking import shrink_run

    caplog.set_level("INFO", logger="lightreg.app")
    model = SequenceClassifier(vocab_size=8, seq_len=4, num_classes=3, d_model=8, nhead=2, layers=1)
    assert shrink_run(model, None, RunContext(tmp_path), "encoder", report=False) == {}
    assert shrink_run(model, None, RunContext(tmp_path), "body", report=False) == {}
    said = capfd.readouterr().out + caplog.text  # the app's lines go to logging where a handler listens
    assert "shrink skipped: encoder (TransformerEncoder): shrink needs an nn.Sequential" in said
    assert "shrink skipped: the model has no submodule 'body' (set shrink_module to one of ['embed', 'position'," in said
    assert not (tmp_path / "shrunk.pt2").exists()


@pytest.mark.slow
def test_the_users_model_under_ddp_cpu_and_fsdp2_cpu(project, tmp_path):
    """Both multi-process strategies on the user's model, as a user starts them (Lightning re-runs the command line)."""
    procs = {name: subprocess.Popen([*COMMAND, "--config-dir", "conf", "experiment=sequences", f"strategy={name}",
                                     "logger=csv", f"hydra.run.dir={tmp_path}/{name}", *TINY], cwd=project,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=app_env())
             for name in ("ddp_cpu", "fsdp2_cpu")}
    try:
        results = {name: p.communicate(timeout=400) for name, p in procs.items()}
    finally:
        for p in procs.values():
            p.kill()
    for name, p in procs.items():
        assert p.returncode == 0, results[name][1][-3000:]
        metrics = json.loads((tmp_path / name / "metrics.json").read_text())
        assert metrics["trainer/global_step"] == 4.0  # 2 epochs x 128 / 32 / 2 ranks
        assert {"val/accuracy", "reg/l1/penalty", "weights/global/sparsity"} <= set(metrics)
        assert metrics["weights/global/sparsity"] > 0
    assert os.path.isfile(tmp_path / "ddp_cpu" / "train_ddp_process_1.log")
