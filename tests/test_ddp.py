"""DDP (2 CPU processes, gloo): both ranks end identical and equal to one process on the global batch.

One spawn trains the whole table (every penalty in every mode, plus gradient accumulation and gradient
clipping) on both ranks; the single-process oracle runs here. Float64 full-batch steps: ~1e-12.
"""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy

from lightreg import GroupLasso, Regularizer
from tests._parity import ADAPTIVE, EPOCHS, N, OneProcess, TwoGroupNet, assert_same, table, train
from tests._spawn import run_on_ranks
from tests.models import TinyNet, loader, regression_data, trainer

pytestmark = pytest.mark.slow

KEYS = table(["l1", "l2", "en", "gl1"])
# (key, per-rank batch, accumulate, clip): the penalty must enter once per optimizer step on the synced
# gradient, and norm clipping must see it as if it were in the loss.
EXTRA = {"accumulate": ("l1-gradient", N // 4, 2, None), "clip": ("en-gradient", N // 2, 1, 0.05),
         "accumulate-prox": ("en-proximal", N // 4, 2, None), "accumulate-decoupled": ("l2-decoupled", N // 4, 2, None)}


LOGGED = "en-proximal"


def _ddp_worker(rank: int, log_dir) -> dict:
    def ddp(**kw):
        return dict(strategy=DDPStrategy(process_group_backend="gloo"), devices=2, **kw)

    out = {key: train(key, batch_size=N // 2, **ddp()) for key in KEYS}
    for name, (key, batch, accumulate, clip) in EXTRA.items():
        out[name] = train(key, batch_size=batch, accumulate=accumulate, clip=clip, **ddp())
    out["groups"] = train("l1-proximal", batch_size=N // 2, model_cls=TwoGroupNet, **ddp())
    for name in ADAPTIVE:
        out[name] = train(name, batch_size=N // 2, **ddp())
    out["logged"] = train(LOGGED, batch_size=N // 2, log_dir=log_dir, **ddp())
    return out


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    return run_on_ranks(_ddp_worker, out, out / "logs")


@pytest.fixture(scope="module")
def oracle():
    return OneProcess()


@pytest.mark.parametrize("key", KEYS + list(EXTRA))
def test_ddp_ranks_identical_and_equal_to_one_process(ddp_runs, oracle, key):
    rank0, rank1 = ddp_runs[0][key], ddp_runs[1][key]
    # Bit-identical across ranks: every rank applies the same penalty to the same all-reduced state.
    assert_same(rank0["weights"], rank1["weights"], tol=0.0)
    base_key, clip = (EXTRA[key][0], EXTRA[key][3]) if key in EXTRA else (key, None)
    single = oracle(base_key, clip=clip)
    assert_same(rank0["weights"], single["weights"])
    assert rank0["metrics"] == pytest.approx(single["metrics"], rel=1e-12)
    assert rank0["steps_applied"] == single["steps_applied"]
    # The penalty really acted: the same run without it ends elsewhere.
    plain = oracle("none")
    moved = max((single["weights"][n] - plain["weights"][n]).abs().max().item() for n in single["names"])
    assert moved > 1e-4


@pytest.mark.parametrize("key", list(ADAPTIVE))
def test_ddp_adaptive_prox_and_target_sparsity_take_the_same_decision_on_every_rank(ddp_runs, oracle, key):
    """Every rank computes the level from the same all-reduced state: identical weights, levels and zeros."""
    rank0, rank1 = ddp_runs[0][key], ddp_runs[1][key]
    assert_same(rank0["weights"], rank1["weights"], tol=0.0)
    assert rank0["metrics"] == rank1["metrics"]
    single = oracle(key)
    assert_same(rank0["weights"], single["weights"])
    for name in single["names"]:
        assert torch.equal(rank0["weights"][name] == 0, single["weights"][name] == 0), name
    assert rank0["metrics"] == pytest.approx(single["metrics"], rel=1e-12)
    if key.startswith("target"):
        name = next(k for k in single["metrics"] if k.endswith("/target")).rsplit("/", 1)[0]
        # Within one unit: the nearest count of 144 weights, or of 17 groups (rows of net.0 and net.3).
        assert single["metrics"][f"{name}/sparsity"] == pytest.approx(single["metrics"][f"{name}/target"], abs=1 / 17)


def test_ddp_clipping_was_active(ddp_runs, oracle):
    """The clip case must actually clip, or it would not test that clipping sees the penalty."""
    unclipped = oracle(EXTRA["clip"][0])
    clipped = ddp_runs[0]["clip"]
    diff = max((clipped["weights"][n] - unclipped["weights"][n]).abs().max().item() for n in clipped["names"])
    assert diff > 1e-4


def test_ddp_param_groups_and_logged_penalty(ddp_runs, oracle, tmp_path):
    single = oracle("l1-proximal", model_cls=TwoGroupNet)
    for rank in ddp_runs:
        assert_same(rank["groups"]["weights"], single["weights"])
    logged_single = train(LOGGED, batch_size=N, log_dir=tmp_path)["logged"]
    logged = ddp_runs[0]["logged"]["logged"]
    assert len(logged) == len(logged_single) >= 4
    for row, expected in zip(logged, logged_single, strict=True):
        assert row == pytest.approx(expected, rel=1e-12)
    assert "logged" not in ddp_runs[1]["logged"]  # only rank zero wrote a log


def test_ddp_spawn_from_the_main_process(oracle):
    """``strategy="ddp_spawn"`` (Lightning launches the ranks; rank 0's weights come back to this process)."""
    x, y = regression_data(n=N)
    model = TinyNet(lr=0.05)
    trainer(max_epochs=EPOCHS, strategy="ddp_spawn", devices=2, callbacks=[Regularizer(GroupLasso(0.2, dim=1))]).fit(
        model, loader(x, y, batch_size=N // 2))
    single = oracle("gl1-proximal")
    assert_same({n: p.detach() for n, p in model.named_parameters()}, single["weights"])
