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

N, BATCH, STEPS, SKIP = 16, 4, 6, 2
INIT_SCALE = 16.0  # small enough that nothing overflows except the step made to
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


def fit(precision, callbacks=(), **model_kw):
    x, y = regression_data(n=N, dtype=torch.float32)
    skip_at = SKIP if precision == "16-mixed" else None
    model = OverflowNet(skip_at=skip_at, lr=0.05, **model_kw)
    if precision == "16-mixed":
        scaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE, growth_interval=1000)
        kw = dict(plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    else:
        scaler, kw = None, dict(precision=precision)
    history = History()
    trainer(max_steps=STEPS, max_epochs=-1, callbacks=[*callbacks, history], **kw).fit(model, loader(x, y, batch_size=BATCH))
    if scaler is not None:  # exactly the one forced skip happened
        assert scaler.get_scale() == INIT_SCALE / 2
    return model, history


def _fp32_penalty(penalty):
    def extra_loss(model):
        with torch.autocast("cpu", enabled=False):  # the formula itself, in the parameters' float32
            return penalty([model.net[0].weight, model.net[3].weight])
    return extra_loss


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
@pytest.mark.parametrize("key", list(PENALTIES))
def test_gradient_mode_equals_penalty_in_loss(precision, key):
    reg = Regularizer(PENALTIES[key], mode="gradient")
    model, _ = fit(precision, [reg])
    oracle, _ = fit(precision, extra_loss=_fp32_penalty(PENALTIES[key]))
    for a, b in zip(model.parameters(), oracle.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert reg.steps_applied == STEPS - int(precision == "16-mixed")


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_decoupled_l2_with_adam_equals_adamw(precision):
    reg = Regularizer(L2(0.5), mode="decoupled", include="*")
    model, history = fit(precision, [reg], optimizer="adam")
    oracle, _ = fit(precision, optimizer="adamw", optimizer_kwargs={"weight_decay": 0.5})
    for a, b in zip(model.parameters(), oracle.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    if precision == "16-mixed":  # the skipped step left every weight as it was: no decay either
        assert all(torch.equal(a, b) for a, b in zip(history.weights[SKIP - 1], history.weights[SKIP], strict=True))


def _manual_proximal(precision, alpha):
    """Autocast + GradScaler + SGD by hand; soft-threshold after each step that really ran."""
    torch.manual_seed(0)
    model = OverflowNet(lr=0.05)
    x, y = regression_data(n=N, dtype=torch.float32)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    dtype = torch.float16 if precision == "16-mixed" else torch.bfloat16
    scaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE, growth_interval=1000, enabled=precision == "16-mixed")
    for step in range(STEPS):
        xb, yb = x[step * BATCH % N:][:BATCH], y[step * BATCH % N:][:BATCH]
        with torch.autocast("cpu", dtype=dtype, cache_enabled=False):
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


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_proximal_skips_with_the_step(precision):
    reg = Regularizer(L1(0.5), mode="proximal")
    model, history = fit(precision, [reg])
    oracle = _manual_proximal(precision, 0.5)
    for a, b in zip(model.parameters(), oracle.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert (model.net[0].weight == 0).any()  # the prox really acted
    if precision == "16-mixed":
        assert reg.steps_applied == STEPS - 1
        assert all(torch.equal(a, b) for a, b in zip(history.weights[SKIP - 1], history.weights[SKIP], strict=True))
