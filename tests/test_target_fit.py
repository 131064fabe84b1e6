"""Target sparsity in real fits: the ramped fraction reached exactly, logged, frozen, resumed bit for bit."""

import math

import lightning.pytorch as pl
import pytest
import torch

from lightreg import L0, L1, ElasticNet, GroupLasso, Regularizer
from tests.models import TinyNet, loader, regression_data, trainer

EPOCHS, BATCHES = 6, 4  # 24 steps: ramp over steps [0, 16), frozen from 16 on


def selected(m):
    return [m.net[0].weight, m.net[3].weight]


def zero_units(penalty, m):
    if isinstance(penalty, GroupLasso):
        dim = penalty.dim
        return sum(int((w == 0).all(dim=1 - dim).sum()) for w in selected(m)), sum(w.shape[dim] for w in selected(m))
    return sum(int((w == 0).sum()) for w in selected(m)), sum(w.numel() for w in selected(m))


class Record(pl.Callback):
    """The zero pattern after every step, and the Regularizer's metrics."""

    def __init__(self, reg):
        self.reg, self.masks, self.metrics = reg, [], []

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.masks.append([w.detach() == 0 for w in selected(pl_module)])
        self.metrics.append({k: float(v) for k, v in self.reg.metrics().items()})


class StopAfter(pl.Callback):
    """An interruption: the fit is configured for EPOCHS but ends after ``epochs`` (its window is the full fit's)."""

    def __init__(self, epochs):
        self.epochs = epochs

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch + 1 == self.epochs:
            trainer.should_stop = True


def run(penalty, optimizer="adam", lr=0.01, stop_epoch=None, ckpt_path=None, save_dir=None, **kwargs):
    x, y = regression_data(dtype=torch.float32)
    model = TinyNet(h=32, optimizer=optimizer, lr=lr, dtype=torch.float32)
    reg = Regularizer(penalty, **{"target_sparsity": 0.75, **kwargs})
    record = Record(reg)
    callbacks = [reg, record] + ([StopAfter(stop_epoch)] if stop_epoch else [])
    if save_dir is not None:
        callbacks.append(pl.callbacks.ModelCheckpoint(dirpath=save_dir, every_n_epochs=1, save_top_k=-1))
    trainer(callbacks=callbacks, max_epochs=EPOCHS, enable_checkpointing=save_dir is not None).fit(
        model, loader(x, y, batch_size=16), ckpt_path=ckpt_path)
    return model, reg, record


@pytest.mark.parametrize("penalty, optimizer", [(L1(0.0), "adam"), (L0(0.0), "adamw"), (ElasticNet(0.0, 0.5), "sgd"),
                                                (GroupLasso(0.0, dim=1), "adam"), (L0(0.0), "sgd")], ids=str)
def test_the_ramped_target_is_met_at_every_step_then_frozen(penalty, optimizer):
    model, reg, record = run(penalty, optimizer, lr=0.01 if optimizer != "sgd" else 0.1)
    window = reg.target.window
    assert (window.start, window.end, window.freeze) == (0, 16, 16)
    name = reg.name
    for step, metrics in enumerate(record.metrics):
        zeros, units = zero_units(penalty, model) if step == len(record.metrics) - 1 else (None, None)
        target = reg.target.fraction(step)
        assert metrics[f"reg/{name}/target"] == pytest.approx(target)
        # The level zeroes round(target * units) units (ties may add one more); logged = measured.
        units = units or zero_units(penalty, model)[1]
        expected = math.floor(target * units + 0.5)
        assert expected <= round(metrics[f"reg/{name}/sparsity"] * units) <= expected + 1, step
        assert (metrics[f"reg/{name}/alpha"] > 0) == (step < window.freeze)
    assert zeros == round(0.75 * units)
    # Frozen from step 16: the zero pattern never changes again.
    for masks in record.masks[16:]:
        assert all(torch.equal(a, b) for a, b in zip(masks, record.masks[15]))


def test_target_every_n_steps_selects_on_those_steps_and_before_the_freeze():
    _, reg, record = run(L1(0.0), target_every=5)
    alphas = [m["reg/l1/alpha"] for m in record.metrics]
    changes = [s for s in range(1, 16) if alphas[s] != alphas[s - 1]]
    assert changes == [5, 10, 15] and alphas[16:] == [0.0] * 8


def test_logged_every_log_step(tmp_path):
    x, y = regression_data(dtype=torch.float32)
    reg = Regularizer(L0(0.0), target_sparsity=0.5)
    trainer(callbacks=[reg], max_epochs=2, logger=pl.loggers.CSVLogger(tmp_path), log_every_n_steps=1).fit(
        TinyNet(optimizer="adam", lr=0.01, dtype=torch.float32), loader(x, y, batch_size=16))
    import csv

    (path,) = tmp_path.glob("**/metrics.csv")
    rows = [r for r in csv.DictReader(path.open()) if r.get("reg/l0/target")]
    assert len(rows) == 8 and {"reg/l0/alpha", "reg/l0/sparsity", "reg/l0/penalty"} <= set(rows[0])
    assert float(rows[-1]["reg/l0/target"]) == 0.5 and float(rows[-1]["reg/l0/sparsity"]) == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("stop_epoch", [3, 5], ids=["in-the-ramp", "frozen"])
@pytest.mark.parametrize("penalty", [L0(0.0), L1(0.0)], ids=str)
def test_resume_is_bit_exact(tmp_path, penalty, stop_epoch):
    full, full_reg, _ = run(penalty)
    run(penalty, stop_epoch=stop_epoch, save_dir=tmp_path)
    (ckpt,) = tmp_path.glob(f"epoch={stop_epoch - 1}-*.ckpt")
    state = torch.load(ckpt, weights_only=False)["callbacks"][full_reg.state_key]["target"]
    assert state["window"] == (0, 16, 16) and bool(state["masks"]) == (stop_epoch * BATCHES > 16)
    resumed, resumed_reg, _ = run(penalty, ckpt_path=ckpt)
    for (name, p), q in zip(full.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name
    assert resumed_reg.alpha == full_reg.alpha == 0.0 and resumed_reg.steps_applied == full_reg.steps_applied == 24
