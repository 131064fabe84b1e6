"""The digits feature map: drawn from a real (short) run of the preset, the pixel count it logs to W&B equals the
non-zero columns of the checkpoint's first layer, and the script draws the same map from that checkpoint."""

from __future__ import annotations

import glob
import importlib.util
import json
from pathlib import Path

import matplotlib.image
import pytest
import torch

from lightreg.app.config import RunContext
from lightreg.app.feature_map import draw_feature_map, used_features
from lightreg.app.train import run
from tests.test_app_run import compose_cfg
from tests._readers import finished_wandb_records as finished_records, items

ROOT = Path(__file__).resolve().parents[1]


def test_used_pixels_are_the_nonzero_columns(tmp_path):
    weight = torch.randn(5, 64, generator=torch.Generator().manual_seed(0))
    weight[:, [0, 7, 8, 63]] = 0.0
    weight[2, 9] = 0.0  # a single zero does not make a pixel unused
    used = used_features(weight)
    assert used.sum() == 60 and not used[[0, 7, 8, 63]].any() and used[9]
    png = draw_feature_map(weight, tmp_path / "map.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert matplotlib.image.imread(png).shape[2] == 4  # RGBA
    with pytest.raises(ValueError, match=r"weight must be \(out, 64\) for a 8x8 map, got shape \(5, 63\)"):
        draw_feature_map(weight[:, :63], tmp_path / "bad.png")


@pytest.fixture(scope="module")
def preset_run(tmp_path_factory):
    """experiment=feature_selection_digits, shortened to 3 epochs, with the offline W&B logger."""
    out = tmp_path_factory.mktemp("feature_map")
    cfg = compose_cfg("experiment=feature_selection_digits", "trainer.max_epochs=3", "logger=wandb",
                      f"logger.save_dir={out}", "progress_bar=false", "report=false")
    metrics = run(cfg, RunContext(output_dir=out))
    return out, metrics


def test_feature_map_is_drawn_and_logged_from_a_real_run(preset_run):
    out, metrics = preset_run
    png = out / "feature_map.png"
    assert matplotlib.image.imread(png).ndim == 3
    weight = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]["net.0.weight"]
    used = int(used_features(weight).sum())  # the oracle: non-zero columns of the final first layer, counted here
    assert 0 < used < 64  # the column group lasso removed some pixels, not all
    (run_file,) = glob.glob(str(out / "wandb" / "offline-run-*" / "run-*.wandb"))
    history = [items(r.history.item) for r in finished_records(run_file) if r.WhichOneof("record_type") == "history"]
    logged = [row for row in history if "features/used" in row]
    assert [row["features/used"] for row in logged] == [used] and logged[0]["features/total"] == 64
    (image,) = [row for row in history if "feature_map/_type" in row]
    assert image["feature_map/_type"] == "images/separated" and image["feature_map/captions"] == [f"{used} of 64 pixels in use"]
    (media,) = glob.glob(str(out / "wandb" / "offline-run-*" / "files" / image["feature_map/filenames"][0]))
    assert Path(media).read_bytes() == png.read_bytes()  # W&B holds the very picture written to the run directory
    assert json.loads((out / "metrics.json").read_text())["test/acc"] == metrics["test/acc"]


def test_the_script_draws_the_same_map_from_the_checkpoint(preset_run, tmp_path, capsys):
    out, _ = preset_run
    spec = importlib.util.spec_from_file_location("feature_map_script", ROOT / "scripts" / "feature_map.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    png = script.main([str(out), "-o", str(tmp_path / "again.png")])
    assert png.read_bytes() == (out / "feature_map.png").read_bytes()  # same weights, same picture
    weight = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]["net.0.weight"]
    assert f"{int(used_features(weight).sum())} of 64 pixels in use" in capsys.readouterr().out
