"""A step whose lr is 0 (warm-up from 0, cosine ending at 0) changes no weight and no level of a sparsity target.

Oracles: the same fit without lightreg (the optimizer with lr 0 leaves every weight as it was), and a hand-written
loop of SGD + the target's level selection (``torch.sort`` over the concatenated levels, the zero pattern held
between selections) under the same ``LambdaLR``.
"""

import math

import lightning.pytorch as pl
import pytest
import torch
from torch.optim.lr_scheduler import LambdaLR

from lightreg import L0, L1, ElasticNet, GroupLasso, Regularizer
from tests.models import TinyNet, loader, regression_data, trainer


class Scheduled(TinyNet):
    """TinyNet with a per-step ``LambdaLR(factor)``."""

    def __init__(self, factor, **kwargs):
        super().__init__(**kwargs)
        self.factor = factor

    def configure_optimizers(self):
        opt = super().configure_optimizers()
        return {"optimizer": opt, "lr_scheduler": {"scheduler": LambdaLR(opt, self.factor), "interval": "step"}}


class Weights(pl.Callback):
    """The selected weights after every step."""

    def __init__(self):
        self.after = []

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.after.append([pl_module.net[0].weight.detach().clone(), pl_module.net[3].weight.detach().clone()])


def fit(factor, steps, optimizer="adam", lr=0.01, reg=None, dtype=torch.float32, batch_size=16, extra=(), **kwargs):
    x, y = regression_data(dtype=dtype)
    model = Scheduled(factor, h=32, optimizer=optimizer, lr=lr, dtype=dtype)
    weights = Weights()
    trainer(callbacks=[c for c in (reg, weights, *extra) if c is not None], max_steps=steps, max_epochs=-1,
            enable_checkpointing=bool(extra)).fit(model, loader(x, y, batch_size=batch_size), **kwargs)
    return model, weights.after


def zero_count(ws):
    return sum(int((w == 0).sum()) for w in ws)


def warmup_from_zero(step):
    return min(step / 4, 1.0)


@pytest.mark.parametrize("penalty, optimizer, every", [
    (L1(0.0), "adam", None), (ElasticNet(0.0, 0.5), "adam", None), (GroupLasso(0.0, dim=1), "adam", None),
    (L0(0.0), "adam", None), (L0(0.0), "sgd", 5), (L1(0.0), "sgd", 5)], ids=str)
def test_a_warm_up_from_zero_changes_no_weight_then_the_target_is_met(penalty, optimizer, every):
    lr = 0.1 if optimizer == "sgd" else 0.01
    _, plain = fit(warmup_from_zero, 1, optimizer, lr)  # the oracle: the same first step without lightreg
    reg = Regularizer(penalty, target_sparsity=0.75, target_every=every)
    model, after = fit(warmup_from_zero, 24, optimizer, lr, reg)
    assert all(torch.equal(a, b) for a, b in zip(after[0], plain[0]))  # step 0 (lr 0): not a bit moved
    assert all(torch.isfinite(w).all() for ws in after for w in ws) and math.isfinite(reg.alpha)
    if isinstance(penalty, GroupLasso):  # groups are columns (dim=1): 8 + 32 of them
        units, zeros = 8 + 32, sum(int((w == 0).all(dim=0).sum()) for w in after[-1])
    else:
        units = sum(w.numel() for w in after[-1])
        zeros = zero_count(after[-1])
        # A level selected at lr 0 was |w| / 0 = inf: every weight zeroed, for as long as it was held. Now step 0
        # selects nothing, step 1 makes the selection due at step 0, and every selection zeroes its ramped target.
        interval = reg.target.interval
        for step, ws in enumerate(after[:16]):
            assert zero_count(ws) < units, step  # (a held L1 level may overshoot the ramp between selections)
            if step == 1 or (step and step % interval == 0) or step == 15:
                k = math.floor(reg.target.fraction(step) * units + 0.5)
                assert k <= zero_count(ws) <= k + 1, step
    assert zeros == round(0.75 * units)


def test_a_schedule_ending_at_zero_changes_no_weight_on_its_last_steps():
    """No freeze (``target_debias=0``): the level keeps tracking, and the last steps have lr 0."""

    def cosine_to_zero(step):
        return max(0.0, math.cos(math.pi / 2 * step / 21))  # 0 from step 21 on

    reg = Regularizer(L1(0.0), target_sparsity=0.5, target_ramp=(0, 12), target_debias=0)
    _, after = fit(cosine_to_zero, 24, "adam", 0.01, reg)
    for step in (21, 22, 23):
        assert all(torch.equal(a, b) for a, b in zip(after[step], after[step - 1])), step
    assert all(torch.isfinite(w).all() for w in after[-1]) and zero_count(after[-1]) == round(0.5 * 8 * 32 + 0.5 * 32)


def hand_loop(factor, steps, lr, target, ramp_end, every):
    """SGD, full batch, float64, L1 target: the level selected with torch.sort on the due steps (or the first step
    with an lr after a due step that had none) and the prox; in between its zeros held; frozen from ramp_end."""
    x, y = regression_data(dtype=torch.float64)
    model = TinyNet(h=32, optimizer="sgd", lr=lr, dtype=torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    sched = LambdaLR(opt, factor)
    ws = [model.net[0].weight, model.net[3].weight]
    hold, pending, masks, after = None, False, None, []
    for step in range(steps):
        if step == ramp_end:
            masks = [w != 0 for w in ws]
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        now = opt.param_groups[0]["lr"]
        due = step % every == 0 or step == ramp_end - 1
        with torch.no_grad():
            if masks is not None:
                for w, m in zip(ws, masks):
                    w.mul_(m)
            elif now == 0:
                pending = pending or due
            else:
                if due or pending or hold is None:
                    levels, _ = torch.sort(torch.cat([w.abs().flatten() / now for w in ws]))
                    k = math.floor(target * (1 - (1 - (step + 1) / ramp_end) ** 3) * len(levels) + 0.5)
                    alpha = math.nextafter(levels[k - 1].item(), math.inf) if k else 0.0
                    for w in ws:
                        w.copy_(w.sign() * (w.abs() - alpha * now).clamp(min=0))
                    hold, pending = [w != 0 for w in ws], False
                else:
                    for w, m in zip(ws, hold):
                        w.mul_(m)
        after.append([w.detach().clone() for w in ws])
        sched.step()
    return after


def test_selections_and_held_zeros_under_a_scheduled_lr_match_a_hand_written_loop():
    """Selection every 4 steps of a 40-step ramp; lr 0 on steps 0, 1 and 8 (a due step: the selection moves to step 9);
    a warm-up, then a decay; frozen from step 40."""

    def factor(step):
        return 0.0 if step in (0, 1, 8) else min(step / 10, 1.0) * (1 - step / 100)

    reg = Regularizer(L1(0.0), target_sparsity=0.8, target_ramp=(0, 40), target_every=4)
    _, after = fit(factor, 48, "sgd", 0.05, reg, dtype=torch.float64, batch_size=64)
    oracle = hand_loop(factor, 48, 0.05, 0.8, 40, 4)
    for step, (got, want) in enumerate(zip(after, oracle)):
        for a, b in zip(got, want):
            assert torch.equal(a == 0, b == 0), step
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    for step in (1, 8):  # (step 0 against the initial weights: the loop's first step)
        assert all(torch.equal(a, b) for a, b in zip(after[step], after[step - 1])), step
    assert zero_count(after[-1]) == round(0.8 * (8 * 32 + 32))


class StopAt(pl.Callback):
    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        trainer.should_stop = trainer.should_stop or trainer.global_step == self.step


def test_resume_between_selections_with_a_scheduled_lr_is_bit_exact(tmp_path):
    """Selections every 5 steps; the checkpoint after step 11 holds the zero pattern selected at step 10."""

    def make():
        return Regularizer(L1(0.0), target_sparsity=0.75, target_every=5)

    full_reg = make()
    full, _ = fit(warmup_from_zero, 24, reg=full_reg)
    save = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=12, save_top_k=-1)
    fit(warmup_from_zero, 24, reg=make(), extra=[save, StopAt(12)])  # the window of the 24-step fit
    (ckpt,) = tmp_path.glob("*.ckpt")
    state = torch.load(ckpt, weights_only=False)["callbacks"][full_reg.state_key]["target"]
    assert state["selected"] and set(state["masks"]) == {"net.0.weight", "net.3.weight"} and state["seen"] == 12
    resumed_reg = make()
    resumed, _ = fit(warmup_from_zero, 24, reg=resumed_reg, ckpt_path=ckpt)
    for (name, p), q in zip(full.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name
    assert resumed_reg.target.seen == full_reg.target.seen == 24
