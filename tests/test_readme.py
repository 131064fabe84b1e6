"""The README and the docs run as written: their Python blocks, and every command of their shell blocks.

The README's Python blocks run in order in one namespace, as a reader pastes them, with ``model`` and ``datamodule``
(which the quickstart leaves to the reader) bound to a tiny module and data set; each doc's blocks run the same way
with a tiny ``model``/``data``/``x`` and a ``pl.Trainer`` of 2 epochs. Each ``lightreg-train`` command runs with
short settings appended (2 epochs of 3 batches, CSV logger); a sweep keeps the first two values of each swept key.
Set-up commands are checked, not run: they install packages and run this suite; a script's long command (a
benchmark) is checked for its options and for a test of the script's own. ``examples/README.md``:
``tests/test_examples.py``.
"""

from __future__ import annotations

import json
import math
import re
import runpy
import subprocess
import sys

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tests._app import COMMAND, FAST, NO_LOGGING, ROOT, app_env, run_main
from tests._commands import blocks as _blocks
from tests._commands import commands as _commands
from tests._commands import shorten_sweep
from tests._readers import wandb_run
from tests._spawn import free_port

README = (ROOT / "README.md").read_text()
#: The docs whose commands and Python blocks run here too (docs/api.md is generated from the doctested docstrings).
DOCS = sorted(p for p in (ROOT / "docs").glob("*.md") if p.name != "api.md")
#: Appended to every run: short, and no W&B run (the W&B path has its own tests).
SHORT = ("trainer=debug", "callbacks.monitor.every_n_steps=2", "progress_bar=false", "trainer.max_epochs=2", "logger=csv")
MULTI_PROCESS = ("strategy=ddp_cpu", "strategy=fsdp2_cpu")  # Lightning re-runs the command line: a new process


def blocks(language: str) -> list[str]:
    return _blocks(README, language)


def commands() -> list[list[str]]:
    """Every command of the README's and the docs' shell blocks once, in the order of the README, then the docs."""
    out: list[list[str]] = []
    for text in (README, *(p.read_text() for p in DOCS)):
        out += [words for words in _commands(text) if words not in out]
    return out


def kind(words: list[str]) -> str:
    if words[0] == "lightreg-train":
        if "-m" in words:
            return "sweep"
        return "subprocess" if any(w in MULTI_PROCESS for w in words) else "run"
    if words[:2] == ["python", "scripts/plot_sweep.py"]:
        return "plot"
    if words[0] == "python" and len(words) > 1 and words[1].startswith("scripts/") and words[1] != "scripts/api_docs.py":
        return "script"
    if words == [".", ".venv/bin/activate"] or words[:3] == ["python3", "-m", "venv"] or words[0] == "pip":
        return "set-up"
    if words[:3] == ["python", "-m", "pytest"] or words == ["python", "scripts/api_docs.py"]:
        return "tested elsewhere"  # this suite itself; the API reference's own test (test_api_docs.py)
    return "unknown"


def test_every_shell_command_is_known():
    """A command this test does not know how to run would let the README drift: add it to ``kind``."""
    unknown = [" ".join(words) for words in commands() if kind(words) == "unknown"]
    assert not unknown
    assert {kind(w) for w in commands()} >= {"run", "sweep", "plot", "subprocess", "set-up", "script"}


@pytest.mark.parametrize("words", [w for w in commands() if kind(w) == "script"], ids=" ".join)
def test_script_commands_name_a_script_with_those_options_and_a_test_that_runs_it(words):
    """A script's full run takes minutes (a benchmark, a comparison): here its options must exist, and a test of its
    own must run the script (tests/test_<name>.py)."""
    script = ROOT / words[1]
    source = script.read_text()
    for option in (w for w in words[2:] if w.startswith("--")):
        assert f'"{option}"' in source, f"{words[1]} has no option {option}"
    own_test = ROOT / "tests" / f"test_{script.stem}.py"
    assert own_test.is_file() and script.stem in own_test.read_text()


def test_set_up_commands_activate_the_venv_and_install_what_follows_needs():
    """After the two set-up commands, a fresh shell has .venv active, the app (lightreg-train, matplotlib) and the
    test tools installed; CI runs the README's test command."""
    setup = blocks("bash")[0].strip().splitlines()
    setup = [line for line in setup if not line.startswith("#")]
    assert len(setup) == 2
    for line in setup:
        assert line.startswith("python3 -m venv .venv && . .venv/bin/activate && pip install torch==")
    assert "-e '.[app]' && lightreg-train" in setup[0]
    assert setup[1].endswith("-e '.[test]' && python -m pytest -q -n 2")  # 2 pytest-xdist workers
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^app = \[[^]]*"matplotlib', pyproject, flags=re.M | re.S)
    assert 'test = ["lightreg[all]"' in pyproject and 'all = ["lightreg[app,' in pyproject
    ci = (ROOT / ".ci" / "run").read_text()
    install = setup[1].split(" && ", 2)[2]
    assert install.replace("pip install ", "pip install -q ") in ci


def _tiny_model_and_data():
    class Model(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.encoder = nn.Sequential(nn.Linear(4, 8), nn.Tanh())
            self.head = nn.Linear(8, 1)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.mse_loss(self.head(self.encoder(x)), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    class Data(pl.LightningDataModule):
        def train_dataloader(self):
            g = torch.Generator().manual_seed(0)
            return DataLoader(TensorDataset(torch.randn(16, 4, generator=g), torch.randn(16, 1, generator=g)), batch_size=16)

    return Model(), Data()


@pytest.mark.filterwarnings("ignore:The number of training batches")  # the tiny data set is one batch
def test_python_blocks_run_in_order():
    model, datamodule = _tiny_model_and_data()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    namespace = {"model": model, "datamodule": datamodule}
    quickstart, *others = blocks("python")
    exec(compile(quickstart, "README.md", "exec"), namespace)  # noqa: S102
    assert namespace["trainer"].current_epoch == 20  # the quickstart's fit ran to the end
    assert model.encoder[0].weight.ne(before["encoder.0.weight"]).any()
    for block in others:
        exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102


def _doc_namespace():
    """What the docs' Python blocks leave to the reader: a tiny ``model`` (an MLP in ``model.net``, layers net.0 to
    net.6 like the app's), its ``data``/``datamodule``, an input ``x``, and ``pl`` whose ``Trainer`` runs 2 epochs."""
    import functools
    import types

    class Net(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.0), nn.Linear(8, 8), nn.ReLU(),
                                     nn.Dropout(0.0), nn.Linear(8, 1))

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.mse_loss(self(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    _, data = _tiny_model_and_data()
    short = functools.partial(pl.Trainer, max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                              enable_model_summary=False)
    shim = types.SimpleNamespace(**{k: getattr(pl, k) for k in dir(pl) if not k.startswith("_")})
    shim.Trainer = short
    return {"pl": shim, "model": Net(), "data": data, "datamodule": data, "x": torch.randn(5, 4), "trainer": short()}


@pytest.mark.filterwarnings("ignore:The number of training batches")
@pytest.mark.parametrize("doc", [p for p in DOCS if "```python" in p.read_text()], ids=lambda p: p.name)
def test_the_docs_python_blocks_run_in_order(doc):
    namespace = _doc_namespace()
    for block in _blocks(doc.read_text(), "python"):
        exec(compile(block, str(doc), "exec"), namespace)  # noqa: S102


@pytest.mark.parametrize("words", [w for w in commands() if kind(w) == "run"], ids=" ".join)
def test_single_run_commands(words, tmp_path, monkeypatch, capsys, fresh_hydra):
    status = run_main([*words[1:], f"hydra.run.dir={tmp_path}/run", *SHORT, *NO_LOGGING], monkeypatch)
    out, err = capsys.readouterr()
    assert status == 0, err[-3000:]
    if "--cfg" in words:
        assert "_target_: lightreg" in out and not (tmp_path / "run").exists()
    else:
        assert {"val/loss", "test/loss", "weights/global/sparsity"} <= set(json.loads((tmp_path / "run" / "metrics.json").read_text()))


@pytest.mark.slow
@pytest.mark.parametrize("words", [w for w in commands() if kind(w) == "subprocess"], ids=" ".join)
def test_multi_process_command_agrees_with_ddp_spawned_in_a_sweep(words, tmp_path, monkeypatch, capfd, fresh_hydra):
    """The README's multi-process command as a user runs it (its own process; Lightning re-runs the command line
    for rank 1) and, meanwhile in this process, DDP started by spawn inside a sweep job (W&B logging from the
    spawned rank 0): two launchers, two strategies, 2 CPU processes each, one answer."""
    out, sweep = tmp_path / "run", tmp_path / "ddp"
    short = [arg for arg in SHORT if arg != "progress_bar=false"]  # show the progress lines a user reads
    user = subprocess.Popen([*COMMAND, *words[1:], f"hydra.run.dir={out}", *short], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=app_env())
    monkeypatch.setenv("MASTER_PORT", str(free_port()))  # this process's own rendezvous, put back after the test
    try:
        status = run_main(["-m", "strategy=ddp_cpu", "strategy.start_method=spawn", f"hydra.sweep.dir={sweep}", *FAST,
                           *NO_LOGGING], monkeypatch)
        stdout, stderr = user.communicate(timeout=300)
    finally:
        user.kill()
    assert status == 0, capfd.readouterr().err[-3000:]
    assert [p.name for p in sweep.iterdir() if p.is_dir()] == ["0"]  # one job, one W&B run: not re-run per rank
    assert "reg/elastic_net/penalty" in wandb_run(sweep / "0")["history"]
    assert user.returncode == 0, stderr[-3000:]
    assert (out / "train_ddp_process_1.log").is_file()  # rank 1 re-ran the same single job, not a sweep
    # What a run prints off a terminal: the selection, a line per epoch, the table, where the results are; no noise.
    for noise in ("Tip:", "anonymous", "log_every_n_steps", "it/s]", "INFO: "):
        assert noise not in stdout + stderr, noise
    assert max(map(len, (stdout + stderr).splitlines())) <= 200
    assert [line.split()[0] for line in stdout.splitlines() if line.startswith("epoch=")] == ["epoch=0", "epoch=1"]
    log = (out / "train.log").read_text()  # the same lines, with times, in the run's log file
    assert "Regularizer 'elastic_net'" in log and "epoch=1 step=6" in log and f"metrics: {out / 'metrics.json'}" in log
    ddp, user_run = (json.loads((d / "metrics.json").read_text()) for d in (sweep / "0", out))
    assert ddp["trainer/global_step"] == 6.0  # 2 epochs x 3 batches, each rank on its half of every batch
    assert ddp["weights/global/sparsity"] > 0 and ddp["reg/elastic_net/penalty"] > 0
    # Sharded (DTensor) or replicated parameters, either launcher: the same training, the same final figures
    # (the penalty as the spawned rank 0 left it, not the main process's copy of the callback).
    for key in ("val/loss", "test/loss", "weights/global/sparsity", "weights/net.0.weight/sparsity", "trainer/global_step",
                "reg/elastic_net/penalty"):
        assert user_run[key] == pytest.approx(ddp[key], rel=1e-4, abs=1e-6), key


@pytest.mark.slow
def test_sweeps_and_the_plot(monkeypatch, capsys, fresh_hydra, tmp_path):
    """The sweep commands in order (two values per swept key), then the plot command on what they wrote."""
    for words in commands():
        if kind(words) == "sweep":
            args, sizes = zip(*(shorten_sweep(w) for w in words[1:]), strict=True)
            jobs = math.prod(sizes)
            before = len(list(tmp_path.rglob("metrics.json")))
            status = run_main([*args, *SHORT, *NO_LOGGING], monkeypatch)
            assert status == 0, capsys.readouterr().err[-3000:]
            assert len(list(tmp_path.rglob("metrics.json"))) - before == jobs  # every job of the sweep finished
        elif kind(words) == "plot":
            output = words[words.index("-o") + 1]
            monkeypatch.setattr(sys, "argv", words[1:])
            with pytest.raises(SystemExit) as done:
                runpy.run_path(str(ROOT / words[1]), run_name="__main__")
            assert done.value.code == 0
            assert (tmp_path / output).read_bytes()[:4] == b"\x89PNG"
            assert output.startswith("multirun/")  # an ignored folder, never the repository root


def test_the_regularizer_signature_in_the_docs_is_the_live_one():
    """docs/regularizer.md opens with the signature: the same names and defaults as the class (a new argument shows)."""
    import inspect

    from lightreg import Regularizer

    text = (ROOT / "docs" / "regularizer.md").read_text()
    written = re.search(r"`Regularizer\((.*?)\)`", text, flags=re.S).group(1).split(",")
    live = [f"{name}={param.default!r}".replace("'", '"') if param.default is not param.empty else name
            for name, param in inspect.signature(Regularizer.__init__).parameters.items() if name != "self"]
    assert [w.strip() for w in written] == live
