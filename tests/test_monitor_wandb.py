"""A real offline W&B run: read back what the run wrote (its .wandb log and table file), no mock."""

from __future__ import annotations

import glob
import json
import os

import pytest
import wandb
from lightning.pytorch.loggers import WandbLogger

from lightreg import L1, Regularizer, WeightMonitor, sparsity_report
from lightreg.stats.report import REPORT_COLUMNS
from tests._readers import finished_wandb_records, items
from tests.models import TinyNet, loader, regression_data, trainer
from tests.test_monitor import ALPHA, LR, SELECTED, ista_reference, oracle_figures


@pytest.mark.slow
def test_offline_run_receives_metrics_histograms_table_and_summary(tmp_path):
    x, y = regression_data()
    model = TinyNet(lr=LR)
    logger = WandbLogger(project="lightreg-test", save_dir=str(tmp_path))
    monitor = WeightMonitor(every_n_steps=2, histogram_every_n_steps=3)
    try:
        trainer(max_steps=5, max_epochs=-1, logger=logger, callbacks=[monitor, Regularizer(L1(ALPHA))]).fit(
            model, loader(x, y, batch_size=16)
        )
        run_dir = os.path.dirname(logger.experiment.dir)
    finally:
        wandb.finish()
    (log_file,) = glob.glob(f"{run_dir}/run-*.wandb")
    history, summary = [], {}
    for record in finished_wandb_records(log_file):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append(items(record.history.item))
        elif kind == "summary":
            summary.update(items(record.summary.update))

    # per-layer scalars after global steps 2 and 4, equal to hand-written ISTA
    want = ista_reference(5, 16)
    scalars = [row for row in history if "weights/global/sparsity" in row]
    assert [row["trainer/global_step"] for row in scalars] == [1, 3]
    for row in scalars:
        for key, value in want[row["trainer/global_step"] + 1].items():
            assert row[key] == pytest.approx(value, rel=1e-12, abs=1e-15), key

    # histograms after global step 3: every weight counted once
    hists = [row for row in history if f"weights/{SELECTED[0]}/hist/values" in row]
    assert [row["trainer/global_step"] for row in hists] == [2]
    for name in SELECTED:
        counts, bins = hists[0][f"weights/{name}/hist/values"], hists[0][f"weights/{name}/hist/bins"]
        assert sum(counts) == dict(model.named_parameters())[name].numel() and len(bins) == len(counts) + 1

    # the fit-end table: one row per layer, the final weights
    (table_row,) = [row for row in history if "weights/table/path" in row]
    assert table_row["weights/table/_type"] == "table-file"
    with open(os.path.join(run_dir, "files", table_row["weights/table/path"])) as f:
        table = json.load(f)
    assert table["columns"] == list(REPORT_COLUMNS)
    report = sparsity_report(model)
    assert [r[0] for r in table["data"]] == SELECTED
    for got, row in zip(table["data"], report, strict=True):
        assert got[1] == "x".join(map(str, row["shape"])) and got[2] == row["numel"]
        assert got[3:] == pytest.approx([row[c] for c in REPORT_COLUMNS[3:]], rel=1e-12)
    final = oracle_figures(model)
    assert final["weights/global/sparsity"] > 0
    assert summary["weights/global/sparsity"] == pytest.approx(final["weights/global/sparsity"], rel=1e-15)
    assert table["data"][0][3] == pytest.approx(final[f"weights/{SELECTED[0]}/l1"], rel=1e-12)
