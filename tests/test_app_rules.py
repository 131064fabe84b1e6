"""The command line's torch-free checks against the real thing: the value rules against lightreg's constructors (the
same decisions, the same words), and the signatures read from source against ``inspect.signature``."""

from __future__ import annotations

import inspect
import typing

import pytest

import lightreg
from lightreg.app import arguments, rules, signatures
from lightreg.app.config import ConfigError
from lightreg.app.preflight import check_penalty

PENALTIES = {"lightreg.L1": lightreg.L1, "lightreg.L2": lightreg.L2, "lightreg.ElasticNet": lightreg.ElasticNet,
             "lightreg.GroupLasso": lightreg.GroupLasso, "lightreg.L0": lightreg.L0}
CASES = [  # (penalty target, penalty kwargs, Regularizer kwargs)
    *[("lightreg.L1", {"alpha": a}, {}) for a in (-1, -1e-12, 0, 0.5, 1e9, float("inf"), float("nan"))],
    *[("lightreg.ElasticNet", {"alpha": 0.1, "l1_ratio": r}, {}) for r in (-0.1, 0.0, 0.5, 1.0, 1.5)],
    ("lightreg.GroupLasso", {"alpha": 0.1, "dim": 1, "with_bias": True}, {}),
    ("lightreg.GroupLasso", {"alpha": 0.1, "dim": 0, "with_bias": True}, {}),
    *[("lightreg.L1", {"alpha": 0.1}, {"mode": m}) for m in ("proximal", "gradient", "decoupled", "fast")],
    *[("lightreg.L0", {"alpha": 0.1}, {"mode": m}) for m in ("proximal", "gradient", "decoupled")],
    *[("lightreg.L1", {"alpha": 0.1}, {"name": n}) for n in ("", "a/b", "mine")],
    ("lightreg.L1", {"alpha": 0.1}, {"include": []}),
    *[("lightreg.L0", {"alpha": 0.0}, {"target_sparsity": t}) for t in (-0.1, 0.0, 0.5, 0.999, 1.0, 1.5)],
    *[("lightreg.L1", {"alpha": 0.0}, {"target_sparsity": 0.5, "target_every": e}) for e in (0, 1, 10)],
    ("lightreg.L2", {"alpha": 1e-3}, {"target_sparsity": 0.9}),
    ("lightreg.ElasticNet", {"alpha": 1e-3, "l1_ratio": 0.0}, {"target_sparsity": 0.9}),
    ("lightreg.ElasticNet", {"alpha": 1e-3, "l1_ratio": 0.3}, {"target_sparsity": 0.9}),
    ("lightreg.L1", {"alpha": 1e-3}, {"target_sparsity": 0.9, "mode": "gradient"}),
    ("lightreg.GroupLasso", {"alpha": 1e-3, "dim": 0}, {"target_sparsity": 0.9}),
]


@pytest.mark.parametrize("target, penalty, reg", CASES, ids=str)
def test_rules_refuse_what_the_constructors_refuse_in_the_same_words(target, penalty, reg):
    try:
        lightreg.Regularizer(PENALTIES[target](**penalty), **reg)
        real = None
    except (ValueError, TypeError) as err:
        real = str(err)
    found = rules.penalty_errors(target, penalty) + rules.regularizer_errors(target, penalty, reg)
    if real is None:
        assert found == []
    else:
        assert found and found[0][1] == real
        with pytest.raises(ConfigError) as refused:
            check_penalty({"_target_": target, **penalty, **reg})
        assert real in str(refused.value)


def test_rules_know_the_modes_and_penalties_lightreg_has():
    from lightreg.callbacks.regularizer import MODES

    assert rules.MODES == MODES
    assert sorted(p.rsplit(".", 1)[1] for p in rules.PENALTIES) == sorted(
        n for n in lightreg.__all__ if isinstance(getattr(lightreg, n), type) and issubclass(getattr(lightreg, n), lightreg.Penalty)
        and n != "Penalty")
    kinds = ("L1", "L2", "L0", "GroupLasso", "CoupledGroupLasso", "CoupledGroupL0")
    assert sorted(rules.MAKES_ZEROS) == sorted([*(n for n in kinds if getattr(lightreg, n)(0.1).makes_zeros), "ElasticNet"])
    assert rules.PROXIMAL_ONLY == tuple(n for n in kinds if getattr(lightreg, n)(0.1).proximal_only)


@pytest.mark.parametrize("target, kwargs", [
    ("lightreg.app.models.MLP", {"momentum": 1.5}), ("lightreg.app.models.MLP", {"depth": -1}),
    ("lightreg.app.models.MLP", {"activation": "swish"}), ("lightreg.app.models.CNN", {"lr": 0.0}),
    ("lightreg.app.models.Linear", {"optimizer": "lbfgs"}), ("lightreg.app.models.MLP", {"weight_decay": -1.0}),
    ("lightreg.app.data.TabularData", {"name": "iris"}), ("lightreg.app.data.TabularData", {"batch_size": 0}),
    ("lightreg.app.data.TabularData", {"val_fraction": 0.6, "test_fraction": 0.5}),
])
def test_model_and_data_checks_are_the_constructors_own(target, kwargs):
    from hydra.utils import get_class

    sizes = {"task": "classification", "in_features": 64, "num_outputs": 10, "input_shape": (1, 8, 8)} if "models" in target else {}
    with pytest.raises(ValueError) as real:
        get_class(target)(**sizes, **kwargs)
    with pytest.raises(ValueError) as early:
        arguments.CHECKS[target](**kwargs)
    assert str(early.value) == str(real.value)


TARGETS = ["lightning.pytorch.Trainer", "lightning.pytorch.strategies.DDPStrategy",
           "lightning.pytorch.strategies.ModelParallelStrategy", "lightning.pytorch.loggers.WandbLogger",
           "lightning.pytorch.loggers.CSVLogger", "lightning.pytorch.loggers.TensorBoardLogger",
           "lightning.pytorch.callbacks.ModelCheckpoint", "lightning.pytorch.callbacks.EarlyStopping",
           "lightning.pytorch.callbacks.LearningRateMonitor", "lightreg.Regularizer", "lightreg.WeightMonitor",
           "lightreg.FreezeZeros", "lightreg.LinearWarmup", "lightreg.StepWindow", *PENALTIES, *arguments.CHECKS]


@pytest.mark.parametrize("target", TARGETS)
def test_signatures_read_from_source_match_the_imported_ones(target):
    """The names the source gives equal inspect's (through **kwargs to the bases, as validate.parameters follows them),
    and every annotation read is one the imported class has, or Any (left open)."""
    from hydra.utils import get_class

    from lightreg.app.validate import parameters

    sig = signatures.signature(target)
    live, open_ = parameters(get_class(target))
    assert sig is not None and list(sig.params) == list(live) and sig.open == open_
    for name, hint in sig.params.items():
        assert hint is typing.Any or live[name] is inspect.Parameter.empty or hint == live[name] or \
            typing.get_origin(hint) is typing.get_origin(live[name]) is not None, name


def test_a_signature_that_cannot_be_read_is_left_open_or_unknown(tmp_path, monkeypatch):
    (tmp_path / "userpkg").mkdir()
    (tmp_path / "userpkg" / "__init__.py").write_text("from .nets import Net as Exported\n")
    (tmp_path / "userpkg" / "nets.py").write_text(
        "import somewhere_unknown\n"
        "class Base(somewhere_unknown.Module):\n    pass\n"
        "class Net(Base):\n    def __init__(self, width: 'int' = 3, **kwargs):\n        super().__init__(**kwargs)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    sig = signatures.signature("userpkg.Exported")
    assert sig.params == {"width": int} and sig.open  # **kwargs reach a base it cannot read: any key may be fine
    assert signatures.signature("userpkg.nets.Missing") is None and signatures.signature("no_such_package.X") is None
