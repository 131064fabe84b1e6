"""WeightMonitor through a real CSVLogger: names, steps, and values after the proximal step."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from lightreg import L1, Regularizer, WeightMonitor
from tests._fresh_process import import_facts
from tests._readers import read_csv
from tests.models import TinyNet, loader, regression_data, trainer

LR, ALPHA = 0.05, 0.5
SELECTED = ["net.0.weight", "net.3.weight"]


def weight_rows(rows: list[dict[str, str]]) -> dict[int, dict[str, float]]:
    """``{step: {metric: value}}`` for the rows that carry weights/ metrics."""
    out: dict[int, dict[str, float]] = {}
    for row in rows:
        values = {k: float(v) for k, v in row.items() if k.startswith("weights/") and v != ""}
        if values:
            out.setdefault(int(row["step"]), {}).update(values)
    return out


def oracle_figures(model: nn.Module) -> dict[str, float]:
    """vector_norm and explicit counts of the selected weights of ``model``."""
    out, zeros, total = {}, 0, 0
    params = dict(model.named_parameters())
    for name in SELECTED:
        w = params[name].detach()
        out[f"weights/{name}/l1"] = torch.linalg.vector_norm(w, 1).item()
        out[f"weights/{name}/l2"] = torch.linalg.vector_norm(w, 2).item()
        n_zero = sum(v == 0 for v in w.flatten().tolist())
        out[f"weights/{name}/sparsity"] = n_zero / w.numel()
        zeros, total = zeros + n_zero, total + w.numel()
    out["weights/global/sparsity"] = zeros / total
    return out


def ista_reference(steps: int, batch_size: int) -> dict[int, dict[str, float]]:
    """The same training written out by hand: SGD step, then soft-thresholding of the selected weights."""
    x, y = regression_data()
    model = TinyNet(lr=LR)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    params = dict(model.named_parameters())
    figures, batches = {}, list(loader(x, y, batch_size))
    for step in range(1, steps + 1):
        bx, by = batches[(step - 1) % len(batches)]
        opt.zero_grad()
        nn.functional.mse_loss(model(bx), by).backward()
        opt.step()
        with torch.no_grad():
            for name in SELECTED:
                w = params[name]
                w.copy_(torch.sign(w) * torch.clamp(w.abs() - LR * ALPHA, min=0))
        figures[step] = oracle_figures(model)
    return figures


@pytest.mark.parametrize("monitor_first", [True, False])
def test_csv_logger_gets_the_figures_after_the_prox_whatever_the_order(monitor_first):
    monitor = WeightMonitor(every_n_steps=2)
    reg = Regularizer(L1(ALPHA), mode="proximal")
    logger = CSVLogger(".", name="csv")
    callbacks = [monitor, reg] if monitor_first else [reg, monitor]
    x, y = regression_data()
    trainer(max_steps=6, max_epochs=-1, logger=logger, callbacks=callbacks, log_every_n_steps=1).fit(
        TinyNet(lr=LR), loader(x, y, batch_size=16)
    )
    logged = weight_rows(read_csv(logger))
    want = ista_reference(6, 16)
    # logged after global_step 2, 4, 6, on the rows Lightning numbers 1, 3, 5
    assert sorted(logged) == [1, 3, 5]
    names = {f"weights/{n}/{f}" for n in SELECTED for f in ("l1", "l2", "sparsity")} | {"weights/global/sparsity"}
    for step, values in logged.items():
        assert set(values) == names
        for key, value in values.items():
            assert value == pytest.approx(want[step + 1][key], rel=1e-12, abs=1e-15), (step, key)
    assert logged[5]["weights/global/sparsity"] > 0.2  # the prox really zeroed weights: not a vacuous check


class CountingMonitor(WeightMonitor):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.computed = 0

    def compute(self, extras=None):
        self.computed += 1
        return super().compute(extras)


def test_accumulation_logs_once_per_optimizer_step_and_nothing_in_between():
    monitor = CountingMonitor(every_n_steps=2, extras=["near_zero", "linf", "structured"])
    logger = CSVLogger(".", name="csv")
    x, y = regression_data()
    model = TinyNet(lr=LR)
    tr = trainer(max_steps=4, max_epochs=-1, logger=logger, callbacks=[monitor], accumulate_grad_batches=2,
                 log_every_n_steps=1)
    tr.fit(model, loader(x, y, batch_size=8))  # 8 micro-batches per epoch, 4 optimizer steps
    logged = weight_rows(read_csv(logger))
    assert monitor.computed == 2 and sorted(logged) == [1, 3]
    final = logged[3]
    for name in SELECTED:  # the last row is the weights the fit left
        w = dict(model.named_parameters())[name].detach()
        assert final[f"weights/{name}/l1"] == pytest.approx(torch.linalg.vector_norm(w, 1).item(), rel=1e-12)
        assert final[f"weights/{name}/linf"] == w.abs().max().item()
        assert final[f"weights/{name}/near_zero"] == ((w.abs() <= 1e-8).sum() / w.numel()).item()
        assert final[f"weights/{name}/dead_rows"] == 0 and final[f"weights/{name}/dead_cols"] == 0
    assert not any(k.startswith("weights/") for k in tr.progress_bar_metrics)
    assert not any(k.startswith("weights/") for k in tr.callback_metrics)


def test_extras_names_skip_structured_figures_of_vectors():
    monitor = WeightMonitor(every_n_steps=1, include=["net.0.*"], extras=("structured", "linf"))
    logger = CSVLogger(".", name="csv")
    x, y = regression_data()
    trainer(max_steps=1, logger=logger, callbacks=[monitor]).fit(TinyNet(), loader(x, y))
    (values,) = weight_rows(read_csv(logger)).values()
    assert set(values) == {
        "weights/net.0.weight/l1", "weights/net.0.weight/l2", "weights/net.0.weight/sparsity",
        "weights/net.0.weight/linf", "weights/net.0.weight/dead_rows", "weights/net.0.weight/dead_cols",
        "weights/net.0.bias/l1", "weights/net.0.bias/l2", "weights/net.0.bias/sparsity", "weights/net.0.bias/linf",
        "weights/global/sparsity",
    }


def test_dead_units_and_inputs_are_counted_in_training():
    class Dead(TinyNet):
        def optimizer_step(self, *args, **kwargs):
            super().optimizer_step(*args, **kwargs)
            with torch.no_grad():  # right after each step: 3 dead hidden units, 2 unused inputs
                self.net[0].weight[:3] = 0
                self.net[0].weight[:, :2] = 0

    monitor = WeightMonitor(every_n_steps=1, extras=["structured"])
    logger = CSVLogger(".", name="csv")
    x, y = regression_data()
    trainer(max_steps=1, logger=logger, callbacks=[monitor]).fit(Dead(), loader(x, y))
    values = weight_rows(read_csv(logger))[0]
    assert values["weights/net.0.weight/dead_rows"] == 3 / 16 and values["weights/net.0.weight/dead_cols"] == 2 / 8
    assert values["weights/net.0.weight/sparsity"] == (3 * 8 + 2 * 13) / 128


def test_print_table_at_fit_end(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    x, y = regression_data()
    trainer(max_steps=1, logger=CSVLogger(".", name="csv"), callbacks=[WeightMonitor(print_table=True)]).fit(
        TinyNet(), loader(x, y)
    )
    out = capsys.readouterr().out
    assert "Weight sparsity" in out and "net.0.weight" in out and "net.3.weight" in out


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"every_n_steps": 0}, ValueError, "every_n_steps must be >= 1, got 0"),
        ({"every_n_steps": 2.0}, TypeError, "every_n_steps must be an int, got 2.0"),
        ({"extras": ["l3"]}, ValueError, "extras must hold names from .*'l3'"),
        ({"extras": 3}, TypeError, "extras must be a sequence .* got 3"),
        ({"eps": -1.0}, ValueError, "eps must be in"),
        ({"histogram_every_n_steps": 0}, ValueError, "histogram_every_n_steps must be >= 1"),
        ({"print_table": "yes"}, TypeError, "print_table must be a bool, got 'yes'"),
        ({"include": [3]}, TypeError, "include must hold non-empty glob strings"),
    ],
)
def test_bad_arguments_are_named(kwargs, error, match):
    with pytest.raises(error, match=match):
        WeightMonitor(**kwargs)


def test_a_pattern_matching_nothing_fails_at_fit_start():
    x, y = regression_data()
    with pytest.raises(ValueError, match="exclude pattern 'encoder.*' matches no parameter"):
        trainer(max_steps=1, logger=CSVLogger(".", name="csv"), callbacks=[WeightMonitor(exclude="encoder.*")]).fit(
            TinyNet(), loader(x, y)
        )


def test_a_single_extra_name_is_accepted():
    assert WeightMonitor(extras="linf").extras == ("linf",)


def test_a_fit_without_wandb_logger_never_imports_wandb():
    """A fit with a WeightMonitor (histograms, the table) and a CSVLogger, in a fresh process
    (tests/_fresh_process.py): wandb is not imported before the fit, nor by it."""
    facts = import_facts()
    assert (facts["WANDB_BEFORE_FIT"], facts["WANDB_AFTER_FIT"]) == (False, False)


def test_manual_optimization_logs_after_each_real_step():
    class Manual(TinyNet):
        def __init__(self):
            super().__init__(lr=LR)
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            opt = self.optimizers()
            opt.zero_grad()
            loss = nn.functional.mse_loss(self(batch[0]), batch[1])
            self.manual_backward(loss)
            if batch_idx % 2 == 1:  # steps on every second batch only
                opt.step()

    monitor = CountingMonitor(every_n_steps=1)
    logger = CSVLogger(".", name="csv")
    x, y = regression_data()
    model = Manual()
    trainer(max_epochs=1, logger=logger, callbacks=[monitor]).fit(model, loader(x, y, batch_size=16))
    logged = weight_rows(read_csv(logger))
    assert monitor.computed == 2 and len(logged) == 2
    w = model.net[0].weight.detach()
    last = logged[max(logged)]
    assert last["weights/net.0.weight/l2"] == pytest.approx(torch.linalg.vector_norm(w).item(), rel=1e-12)
