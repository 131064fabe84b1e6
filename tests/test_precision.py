"""Mixed precision on CPU: ``bf16-mixed``, and ``16-mixed`` with a real ``torch.amp.GradScaler("cpu")``.

Under ``16-mixed`` one step is made to overflow (its loss is inf), so the scaler skips it. Oracles: the
same training with the penalty in the loss (mode ``gradient``: the penalty must reach the *unscaled*
gradient, else it would be off by the loss scale), ``torch.optim.AdamW`` (decoupled ``L2`` with Adam),
and a hand-written autocast + GradScaler loop with the proximal step after each step that ran.
"""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.precision import MixedPrecision

from lightreg import L1, L2, ElasticNet, GroupLasso, Regularizer
from tests.models import TinyNet, loader, regression_data, trainer
from tests.oracles import explicit_value

N, BATCH, STEPS, SKIP = 16, 4, 6, 2
INIT_SCALE = 16.0  # small enough that nothing overflows except the step made to
# CUDA runs the same checks with torch.amp.GradScaler("cuda"); skipped cleanly without a GPU (scripts/gpu_check.sh).
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA")])]
PENALTIES = {"l1": L1(0.05), "l2": L2(0.5), "en": ElasticNet(0.2, 0.5), "gl": GroupLasso(0.05, dim=1)}


class OverflowNet(TinyNet):
    """Float32 TinyNet whose loss is inf at optimizer step ``skip_at`` (under 16-mixed: the scaler skips it)."""

    def __init__(self, skip_at=None, **kw):
        super().__init__(dtype=torch.float32, **kw)
        self.skip_at = skip_at

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("inf") if self.global_step == self.skip_at else loss


class History(Callback):
    def __init__(self):
        self.weights = []

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.weights.append([p.detach().clone() for p in pl_module.parameters()])


def fit(precision, callbacks=(), device="cpu", **model_kw):
    x, y = regression_data(n=N, dtype=torch.float32)
    skip_at = SKIP if precision == "16-mixed" else None
    model = OverflowNet(skip_at=skip_at, lr=0.05, **model_kw)
    if precision == "16-mixed":
        scaler = torch.amp.GradScaler(device, init_scale=INIT_SCALE, growth_interval=1000)
        kw = dict(plugins=[MixedPrecision("16-mixed", device, scaler=scaler)])
    else:
        scaler, kw = None, dict(precision=precision)
    history = History()
    accelerator = "gpu" if device == "cuda" else "cpu"
    trainer(max_steps=STEPS, max_epochs=-1, callbacks=[*callbacks, history], accelerator=accelerator, **kw).fit(
        model, loader(x, y, batch_size=BATCH))
    if scaler is not None:  # exactly the one forced skip happened
        assert scaler.get_scale() == INIT_SCALE / 2
    return model, history


def _fp32_penalty(penalty):
    def extra_loss(model):
        with torch.autocast(model.device.type, enabled=False):  # the formula itself, in the parameters' float32
            return sum(explicit_value(penalty, w) for w in (model.net[0].weight, model.net[3].weight))
    return extra_loss


def _close(model, oracle, device):
    # CUDA float16 matmuls may round a 1-ulp weight difference differently; a penalty on scaled
    # gradients (or a step taken on the skipped batch) would still be off by orders of magnitude more.
    rtol, atol = (1e-6, 1e-7) if device == "cpu" else (1e-4, 1e-5)
    for a, b in zip(model.parameters(), oracle.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
@pytest.mark.parametrize("key", list(PENALTIES))
def test_gradient_mode_equals_penalty_in_loss(precision, key, device):
    reg = Regularizer(PENALTIES[key], mode="gradient")
    model, _ = fit(precision, [reg], device)
    oracle, _ = fit(precision, device=device, extra_loss=_fp32_penalty(PENALTIES[key]))
    _close(model, oracle, device)
    assert reg.steps_applied == STEPS - int(precision == "16-mixed")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_decoupled_l2_with_adam_equals_adamw(precision, device):
    reg = Regularizer(L2(0.5), mode="decoupled", include="*")
    model, history = fit(precision, [reg], device, optimizer="adam")
    oracle, _ = fit(precision, device=device, optimizer="adamw", optimizer_kwargs={"weight_decay": 0.5})
    _close(model, oracle, device)
    if precision == "16-mixed":  # the skipped step left every weight as it was: no decay either
        assert all(torch.equal(a, b) for a, b in zip(history.weights[SKIP - 1], history.weights[SKIP], strict=True))


def _manual_proximal(precision, alpha, device):
    """Autocast + GradScaler + SGD by hand; soft-threshold after each step that really ran."""
    torch.manual_seed(0)
    model = OverflowNet(lr=0.05).to(device)
    x, y = (t.to(device) for t in regression_data(n=N, dtype=torch.float32))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    dtype = torch.float16 if precision == "16-mixed" else torch.bfloat16
    scaler = torch.amp.GradScaler(device, init_scale=INIT_SCALE, growth_interval=1000, enabled=precision == "16-mixed")
    for step in range(STEPS):
        xb, yb = x[step * BATCH % N:][:BATCH], y[step * BATCH % N:][:BATCH]
        with torch.autocast(device, dtype=dtype, cache_enabled=False):
            loss = torch.nn.functional.mse_loss(model(xb), yb)
        if precision == "16-mixed" and step == SKIP:
            loss = loss * float("inf")
        opt.zero_grad()
        scaler.scale(loss).backward()
        scale = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        if scaler.get_scale() >= scale:  # the step ran
            with torch.no_grad():
                for w in (model.net[0].weight, model.net[3].weight):
                    w.copy_(w.sign() * (w.abs() - 0.05 * alpha).clamp(min=0))
    return model


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_proximal_skips_with_the_step(precision, device):
    reg = Regularizer(L1(0.5), mode="proximal")
    model, history = fit(precision, [reg], device)
    oracle = _manual_proximal(precision, 0.5, device)
    _close(model, oracle, device)
    assert (model.net[0].weight == 0).any()  # the prox really acted
    if precision == "16-mixed":
        assert reg.steps_applied == STEPS - 1
        assert all(torch.equal(a, b) for a, b in zip(history.weights[SKIP - 1], history.weights[SKIP], strict=True))


class EmbeddingNet(TinyNet):
    """A 4000 x 64 embedding: Σ|w| ≈ 2e5 overflows a float16 sum (max 65504)."""

    def __init__(self):
        super().__init__(dtype=torch.float32)
        self.embed = torch.nn.Embedding(4000, 64)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self(x) + self.embed.weight[:1, :1], y)


def test_the_logged_penalty_of_a_float16_model_is_finite_and_right(tmp_path):
    import csv

    from lightning.pytorch.loggers import CSVLogger

    model, logger = EmbeddingNet(), CSVLogger(tmp_path)
    reg = Regularizer(L1(1e-4), include="embed.weight")
    x, y = regression_data(n=N, dtype=torch.float32)
    trainer(precision="16-true", max_steps=1, callbacks=[reg], logger=logger, log_every_n_steps=1).fit(
        model, loader(x, y, batch_size=BATCH))
    w = model.embed.weight
    assert w.dtype == torch.float16 and not torch.isfinite(w.abs().sum())  # the float16 sum overflows
    (row,) = [r for r in csv.DictReader(open(f"{logger.log_dir}/metrics.csv")) if r.get("reg/l1/penalty")]
    expected = 1e-4 * w.double().abs().sum().item()  # float64 oracle, ≈ 20
    assert float(row["reg/l1/penalty"]) == pytest.approx(expected, rel=1e-6)
