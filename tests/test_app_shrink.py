"""shrink=true in the app: the saved shrunk module computes what the checkpoint's full model computes, with the
parameters the report counts, and the same test accuracy; a sharding strategy is refused before training."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from lightreg import load_shrunk
from lightreg.app.config import ConfigError, RunContext
from lightreg.app.data import TabularData
from lightreg.app.models import CNN, MLP
from lightreg.app.train import run
from tests.test_app_run import compose_cfg


def test_shrink_writes_a_smaller_model_with_the_same_outputs(tmp_path, capsys):
    cfg = compose_cfg("model=mlp", "data=digits", "penalty=group_lasso", "penalty.dim=0", "penalty.alpha=0.003",
                      "penalty.exclude=[net.6.weight]", "trainer.max_epochs=2", "logger=none", "progress_bar=false",
                      "shrink=true")
    metrics = run(cfg, RunContext(output_dir=tmp_path))
    assert "Shrink (" in capsys.readouterr().out
    small, saved_report = load_shrunk(tmp_path / "shrunk.pt2")  # torch.export: no pickled code
    report = json.loads((tmp_path / "shrink_report.json").read_text())
    assert saved_report == report

    # The oracle: the app's own MLP with the final weights of the run (last.ckpt), on the test split.
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    full = MLP(task="classification", in_features=64, num_outputs=10, depth=2, width=64)
    full.load_state_dict(state)
    x, y = TabularData("digits", seed=cfg.seed).splits["test"].tensors
    with torch.no_grad():
        expected, got = full.eval()(x), small(x)  # an exported program runs as traced, in eval mode
    assert (got - expected).abs().max() <= 1e-5
    assert metrics["shrink/max_abs_diff"] == pytest.approx(float((got - expected).abs().max()), abs=1e-6)
    assert metrics["shrink/test/acc"] == metrics["test/acc"] == pytest.approx(float((expected.argmax(1) == y).double().mean()))

    zero_rows = int((state["net.0.weight"] == 0).all(dim=1).sum())
    assert zero_rows > 0  # the row group lasso killed units, and shrink cut at least those
    rows = {row["name"]: row for row in report["rows"]}  # named as the parameters: net.0, net.3, net.6
    assert rows["net.0"]["units_before"] - rows["net.0"]["units_after"] >= zero_rows
    assert rows["net.0"]["units_after"] == small.state_dict()["0.weight"].shape[0] and rows["net.6"]["units_after"] == 10
    assert metrics["shrink/params_before"] == report["params_before"] == sum(v.numel() for k, v in state.items() if k.startswith("net."))
    assert metrics["shrink/params_after"] == report["params_after"] == sum(p.numel() for p in small.parameters())
    assert report["params_after"] < report["params_before"]
    assert json.loads((tmp_path / "metrics.json").read_text()) == pytest.approx(metrics)


def test_shrink_with_a_sharding_strategy_is_refused_before_training(tmp_path):
    cfg = compose_cfg("strategy=fsdp2_cpu", "shrink=true", "logger=none", "progress_bar=false")
    with pytest.raises(ConfigError, match=r"shrink=true needs the whole network on one rank; strategy ModelParallelStrategy"):
        run(cfg, RunContext(output_dir=tmp_path))
    assert not (tmp_path / "checkpoints").exists()


def test_the_coupled_group_lasso_on_the_cnn_shrinks_with_the_same_outputs(tmp_path):
    """penalty=coupled_group_lasso: a channel's filter and the next conv's input slice die together, and shrink=true
    cuts them with no change of output; groups_alive counts the channels whose filter is not all zero."""
    cfg = compose_cfg("model=cnn", "data=digits", "penalty=coupled_group_lasso", "penalty.alpha=3e-3",
                      "trainer.max_epochs=3", "logger=none", "progress_bar=false", "report=false", "shrink=true")
    metrics = run(cfg, RunContext(output_dir=tmp_path))
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    alive = {name: int(state[f"{name}.weight"].flatten(1).ne(0).any(dim=1).sum()) for name in ("net.1", "net.3")}
    assert metrics["reg/coupled_group_lasso/groups_alive/net.1"] == alive["net.1"] < 8  # some channels died
    assert metrics["reg/coupled_group_lasso/groups_alive/net.3"] == alive["net.3"]
    # A dead channel is dead in its reader too: the next conv's input slice is exactly zero.
    dead = state["net.1.weight"].flatten(1).eq(0).all(dim=1)
    assert state["net.3.weight"][:, dead].eq(0).all()

    small, _ = load_shrunk(tmp_path / "shrunk.pt2")
    full = CNN(task="classification", in_features=64, num_outputs=10, input_shape=(1, 8, 8), channels=8)
    full.load_state_dict(state)
    x, _ = TabularData("digits", seed=cfg.seed).splits["test"].tensors
    with torch.no_grad():
        expected, got = full.eval()(x), small(x)
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()
    assert metrics["shrink/test/acc"] == metrics["test/acc"]
    assert metrics["shrink/params_after"] == sum(p.numel() for p in small.parameters()) < metrics["shrink/params_before"]


def test_a_shrink_module_the_model_lacks_is_refused_before_training(tmp_path):
    cfg = compose_cfg("shrink=true", "shrink_module=body", "logger=none", "progress_bar=false")
    with pytest.raises(ConfigError, match=r"shrink=true: the model has no submodule 'body' \(set shrink_module to one of \['metrics', 'net'\]"):
        run(cfg, RunContext(output_dir=tmp_path))
    assert not (tmp_path / "checkpoints").exists()
