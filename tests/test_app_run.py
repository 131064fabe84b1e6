"""The app's data, models and in-process runs: fast_dev_run per model x data pairing, metrics.json contents."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.preprocessing import StandardScaler

from lightreg.app.config import RunContext
from lightreg.app.data import TabularData, sparse_linear_problem
from lightreg.app.outputs import write_json_atomic
from lightreg.app.train import run, support_metrics
from tests._app import compose_cfg

PAIRINGS = [(m, d) for m in ("linear", "mlp") for d in ("digits", "breast_cancer", "diabetes", "synthetic")]
PAIRINGS.append(("cnn", "digits"))  # the CNN needs images; the others are tables


@pytest.mark.parametrize("name", ["digits", "diabetes"])
def test_split_is_standardised_with_training_statistics(name):
    import sklearn.datasets

    data = TabularData(name, seed=3)
    loader = {"digits": sklearn.datasets.load_digits, "diabetes": sklearn.datasets.load_diabetes}[name]
    x = loader().data
    order = np.random.default_rng(3).permutation(len(x))
    n_val = n_test = round(len(x) * 0.2)
    train, val = x[order[n_val + n_test:]], x[order[:n_val]]
    scaler = StandardScaler().fit(train)  # the oracle: scikit-learn's own scaler
    np.testing.assert_allclose(data.splits["train"].tensors[0].numpy(), scaler.transform(train), atol=1e-5)
    np.testing.assert_allclose(data.splits["val"].tensors[0].numpy(), scaler.transform(val), atol=1e-5)


def test_synthetic_problem_has_the_stated_support():
    x, y, support = sparse_linear_problem(200, 12, 3, noise=0.0, seed=1)
    w, *_ = np.linalg.lstsq(x, y, rcond=None)  # noise-free: least squares recovers w exactly
    assert np.flatnonzero(np.abs(w) > 1e-9).tolist() == np.flatnonzero(support).tolist()
    assert np.all(np.abs(w[support]) >= 1.0) and np.all(np.abs(w[support]) <= 2.0)


def test_support_metrics_count_nonzero_input_columns():
    class Model:
        def input_weight(self):
            return torch.tensor([[0.0, 1.0, 0.0, 2.0, 0.0], [0.0, 0.0, 0.0, 3.0, 4.0]])

    truth = np.array([True, True, False, False, False])  # columns 1, 3 and 4 are used; only 1 is right
    m = support_metrics(Model(), truth)
    assert (m["support/precision"], m["support/recall"], m["support/selected"]) == (1 / 3, 1 / 2, 3.0)
    assert m["support/f1"] == pytest.approx(2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2))


def test_metrics_file_is_replaced_atomically(tmp_path, monkeypatch):
    path = tmp_path / "metrics.json"
    write_json_atomic(path, {"val/acc": 0.5})

    def broken_dumps(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(json, "dumps", broken_dumps)
    with pytest.raises(RuntimeError):
        write_json_atomic(path, {"val/acc": 0.9})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"val/acc": 0.5}  # the old file, whole
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]  # no temporary left behind


@pytest.mark.parametrize("model, data", PAIRINGS)
def test_fast_dev_run(model, data, tmp_path):
    cfg = compose_cfg(f"model={model}", f"data={data}", "logger=none", "trainer.fast_dev_run=true",
                      "progress_bar=false", "report=false")
    run(cfg, RunContext(output_dir=tmp_path))
    saved = json.loads((tmp_path / "metrics.json").read_text())
    score = "acc" if data in ("digits", "breast_cancer") else "mse"
    assert {f"val/{score}", f"test/{score}", "val/loss", "test/loss", "weights/global/sparsity"} <= set(saved)
    assert 0.0 <= saved["weights/global/sparsity"] <= 1.0
    assert (saved["trainer/global_step"], saved["trainer/epoch"]) == (1.0, 0.0)  # one step of the first epoch
    assert ("support/f1" in saved) == (data == "synthetic")


def test_metrics_file_matches_the_saved_weights_and_checkpoint(tmp_path):
    """metrics.json against counts made here from last.ckpt (the final weights), and the checkpoint's own step."""
    cfg = compose_cfg("model=mlp", "data=breast_cancer", "penalty=l1", "penalty.alpha=0.05", "logger=csv",
                      "trainer=debug", "callbacks.monitor.every_n_steps=2", "progress_bar=false", "report=false")
    run(cfg, RunContext(output_dir=tmp_path))
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    # 2 epochs of 3 steps: the last epoch is epoch 1 (from 0, as in the checkpoint's name and its "epoch" field).
    assert (metrics["trainer/epoch"], metrics["trainer/global_step"]) == (1, 6) == (
        checkpoint["epoch"], checkpoint["global_step"])
    (best,) = (p.name for p in (tmp_path / "checkpoints").glob("epoch=*.ckpt"))
    assert best in ("epoch=0-step=3.ckpt", "epoch=1-step=6.ckpt")
    weights = {k: v for k, v in checkpoint["state_dict"].items() if k.startswith("net.") and v.ndim >= 2}
    assert sorted(weights) == ["net.0.weight", "net.3.weight", "net.6.weight"]
    zeros = sum(int((w == 0).sum()) for w in weights.values())
    total = sum(w.numel() for w in weights.values())
    assert zeros > 0  # the proximal L1 step made exact zeros
    assert metrics["weights/global/sparsity"] == pytest.approx(zeros / total, abs=1e-12)
    for name, w in weights.items():
        assert metrics[f"weights/{name}/sparsity"] == pytest.approx(float((w == 0).double().mean()), abs=1e-12)
    l1 = 0.05 * sum(float(w.abs().sum()) for w in weights.values())
    assert metrics["reg/l1/penalty"] == pytest.approx(l1, rel=1e-5)
    assert metrics["reg/l1/alpha"] == 0.05
    csv_rows = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text()
    assert "weights/global/sparsity" in csv_rows and "reg/l1/penalty" in csv_rows


@pytest.mark.slow
def test_lasso_preset_reaches_the_scikit_learn_lasso(tmp_path):
    """``experiment=lasso_diabetes`` is ISTA from zero; its loss is MSE, so it solves sklearn's Lasso(alpha / 2)."""
    from sklearn.linear_model import Lasso

    cfg = compose_cfg("experiment=lasso_diabetes", "logger=none", "progress_bar=false", "report=false")
    metrics = run(cfg, RunContext(output_dir=tmp_path))
    data = TabularData("diabetes", seed=cfg.seed)
    x, y = (t.double().numpy() for t in data.splits["train"].tensors)
    oracle = Lasso(alpha=cfg.penalty.alpha / 2, tol=1e-12, max_iter=100_000).fit(x, y.ravel())
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    w = state["net.0.weight"].double().numpy().ravel()
    np.testing.assert_array_equal(w == 0, oracle.coef_ == 0)  # the same features dropped
    np.testing.assert_allclose(w, oracle.coef_, atol=1e-5)
    assert metrics["weights/global/sparsity"] == float(np.mean(oracle.coef_ == 0)) > 0


@pytest.mark.slow
def test_group_lasso_preset_recovers_the_true_support(tmp_path):
    cfg = compose_cfg("experiment=group_lasso_features", "logger=none", "progress_bar=false", "report=false",
                      "callbacks=monitor")
    metrics = run(cfg, RunContext(output_dir=tmp_path))
    data = TabularData("synthetic", seed=cfg.seed, **{k: cfg.data[k] for k in ("n_samples", "n_features", "n_informative", "noise")})
    assert metrics["support/selected"] == data.true_support.sum() == 5
    assert metrics["support/f1"] == 1.0  # exactly the informative features survive, every other column is 0
    assert metrics["weights/global/sparsity"] == pytest.approx(45 / 50)
