"""Every file of every config group composes and instantiates (Hydra's compose API, no training)."""

from __future__ import annotations

import re
from pathlib import Path

import lightning.pytorch as pl
import pytest
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy
from omegaconf import OmegaConf

import lightreg
from lightreg.app import build, models
from lightreg.app.config import (
    ConfigError,
    RunContext,
    alpha_from_log10,
    config_dir,
)
from lightreg.app.tracking import build_logger, finish_wandb, log_config, wandb_mode
from tests._app import compose_cfg

CONF = Path(config_dir())
GROUPS = ("data", "model", "penalty", "callbacks", "strategy", "logger", "trainer", "experiment", "hparams_search")


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_conf_is_the_repository_top_level_folder():
    assert CONF == Path(__file__).resolve().parents[1] / "conf"
    found = {p.parent.name for p in CONF.glob("*/*.yaml")}
    assert found == set(GROUPS)
    assert [p.name for p in (CONF / "hydra" / "launcher").glob("*.yaml")] == ["slurm.yaml"]
    assert [p.name for p in (CONF / "hydra" / "job_logging").glob("*.yaml")] == ["lightreg.yaml"]


def test_every_valued_key_is_commented():
    uncommented = []
    for path in sorted([*CONF.rglob("*.yaml"), *(CONF.parent / "examples" / "conf").rglob("*.yaml")]):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.match(r"^\s*[A-Za-z_][\w./]*:\s*[^\s#]", line) and "#" not in line:
                uncommented.append(f"{path}:{number}: {line}")
    assert not uncommented, "\n".join(uncommented)


@pytest.mark.parametrize("option", options("data"))
def test_data_options(option):
    data = build.build_data(compose_cfg(f"data={option}"))
    sizes = {s: len(data.splits[s]) for s in ("train", "val", "test")}
    expected_rows = {"digits": 1797, "breast_cancer": 569, "diabetes": 442, "synthetic": 600}[option]
    assert sum(sizes.values()) == expected_rows
    assert data.task == ("regression" if option in ("diabetes", "synthetic") else "classification")
    assert (data.true_support is not None) == (option == "synthetic")


@pytest.mark.parametrize("option", options("model"))
def test_model_options(option):
    cfg = compose_cfg(f"model={option}")
    model = build.build_model(cfg, build.build_data(cfg))
    assert isinstance(model, {"linear": models.Linear, "mlp": models.MLP, "cnn": models.CNN}[option])
    x, _ = build.build_data(cfg).splits["val"][:5]
    assert model(x).shape == (5, 10)
    assert isinstance(model.configure_optimizers(), __import__("torch").optim.SGD)


def test_every_regularizer_argument_is_a_penalty_key_written_once():
    """The live signature against conf/regularizer.yaml, the key split of the build and of the preflight (read from the
    source without importing): an argument added to Regularizer.__init__ and forgotten here fails this test."""
    import inspect

    from lightreg.app import preflight

    live = [n for n in inspect.signature(lightreg.Regularizer.__init__).parameters if n not in ("self", "penalty")]
    assert list(OmegaConf.load(CONF / "regularizer.yaml")) == live
    assert list(build.regularizer_keys()) == live == list(preflight.regularizer_keys())
    for option in options("penalty"):
        text = (CONF / "penalty" / f"{option}.yaml").read_text()
        assert not any(re.match(rf"^{key}:", text, flags=re.M) for key in live), option  # written once, in regularizer.yaml
        if option != "none":
            cfg = compose_cfg(f"penalty={option}")
            assert set(live) <= set(cfg.penalty), option
    for key in live:  # every one reaches the Regularizer from the command line
        cfg = compose_cfg("penalty=l1", "penalty.target_sparsity=0.5", f"penalty.{key}=null")
        assert key not in build.split_penalty(cfg.penalty)[0]
    cfg = compose_cfg("penalty=l1", "penalty.target_sparsity=0.5", "penalty.target_every=10")
    assert build.build_regularizer(cfg.penalty).target.every == 10


def test_no_penalty_argument_shares_a_name_with_a_regularizer_argument():
    import inspect

    live = set(inspect.signature(lightreg.Regularizer.__init__).parameters)
    for cls in (lightreg.L1, lightreg.L2, lightreg.ElasticNet, lightreg.GroupLasso, lightreg.L0):
        assert not live & (set(inspect.signature(cls.__init__).parameters) - {"self"}), cls


@pytest.mark.parametrize("option", options("callbacks"))
def test_callbacks_options(option, tmp_path):
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

    overrides = [f"callbacks=[default,{option}]"] if option not in ("default", "none") else [f"callbacks={option}"]
    if option == "freeze_zeros":
        overrides.append("callbacks.freeze_zeros.start_step=100")
    cfg = compose_cfg(*overrides)
    built = build.build_callbacks(cfg, RunContext(tmp_path), None)
    kinds = {type(c) for c in built}
    expected = {"default": {lightreg.WeightMonitor, ModelCheckpoint}, "none": set(), "monitor": {lightreg.WeightMonitor},
                "checkpoint": {ModelCheckpoint}, "early_stopping": {EarlyStopping}, "freeze_zeros": {lightreg.FreezeZeros}}[option]
    assert expected <= kinds
    for callback in built:
        if isinstance(callback, ModelCheckpoint):
            assert Path(callback.dirpath) == tmp_path / "checkpoints"


def test_any_lightning_callback_by_target_and_one_switched_off(tmp_path):
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint

    cfg = compose_cfg("+callbacks.lr={_target_: lightning.pytorch.callbacks.LearningRateMonitor, logging_interval: step}",
                      "callbacks.last_checkpoint=null")
    built = build.build_callbacks(cfg, RunContext(tmp_path), None)
    (lr,) = [c for c in built if isinstance(c, LearningRateMonitor)]
    assert lr.logging_interval == "step"
    assert [c.filename for c in built if isinstance(c, ModelCheckpoint)] == [None]  # only the best-checkpoint one
    with pytest.raises(ConfigError, match=r"callbacks.lr.interval is not an argument of LearningRateMonitor"):
        build.build_callbacks(compose_cfg("+callbacks.lr={_target_: lightning.pytorch.callbacks.LearningRateMonitor, "
                                          "interval: step}"), RunContext(tmp_path), None)


@pytest.mark.parametrize("option", options("penalty"))
def test_penalty_options(option):
    regularizer = build.build_regularizer(compose_cfg(f"penalty={option}").penalty)
    if option == "none":
        assert regularizer is None
        return
    cls = {"l1": lightreg.L1, "l2": lightreg.L2, "elastic_net": lightreg.ElasticNet, "group_lasso": lightreg.GroupLasso,
           "l0": lightreg.L0, "coupled_group_lasso": lightreg.CoupledGroupLasso, "coupled_group_l0": lightreg.CoupledGroupL0}
    assert isinstance(regularizer, lightreg.Regularizer)
    assert type(regularizer.penalty) is cls[option]
    assert regularizer.mode == "proximal" and regularizer.include is None and regularizer.schedule is None


def test_penalty_fields_reach_the_regularizer():
    cfg = compose_cfg("penalty=elastic_net", "penalty.alpha=0.25", "penalty.l1_ratio=0.3", "penalty.mode=gradient",
                      "penalty.exclude=[net.6.*]", "+penalty.schedule={_target_: lightreg.LinearWarmup, warmup_steps: 7}")
    reg = build.build_regularizer(cfg.penalty)
    assert reg.penalty == lightreg.ElasticNet(0.25, l1_ratio=0.3)
    assert (reg.mode, reg.exclude) == ("gradient", ("net.6.*",))
    assert isinstance(reg.schedule, lightreg.LinearWarmup) and reg.schedule.warmup_steps == 7


def test_target_sparsity_fields_reach_the_regularizer():
    cfg = compose_cfg("penalty=l0", "penalty.target_sparsity=0.9", "penalty.target_ramp=[0,0.5]", "penalty.target_debias=0.25")
    reg = build.build_regularizer(cfg.penalty)
    assert reg.target.target == 0.9 and list(reg.target.ramp) == [0, 0.5] and reg.target.debias == 0.25
    assert reg.preconditioned and build.build_regularizer(compose_cfg("penalty=l1").penalty).target is None
    cfg = compose_cfg("penalty=l1", "penalty.preconditioned=false")
    assert not build.build_regularizer(cfg.penalty).preconditioned


@pytest.mark.parametrize("option, log10_alpha, alpha",
                         [("l1", -5, 1e-5), ("l2", -2.5, 10**-2.5), ("elastic_net", 0, 1.0), ("group_lasso", -1, 0.1)])
def test_log10_alpha_sets_alpha(option, log10_alpha, alpha):
    cfg = compose_cfg(f"penalty={option}", f"penalty.log10_alpha={log10_alpha}")
    assert build.build_regularizer(cfg.penalty).penalty.alpha == pytest.approx(alpha, rel=1e-12)
    assert alpha_from_log10(None, 0.125) == 0.125
    with pytest.raises(ConfigError, match="log10_alpha"):
        alpha_from_log10("big", 1.0)


def test_strategy_group_offers_only_what_the_callbacks_support():
    """FSDP1 and DeepSpeed are refused by the callbacks at fit start, so the app does not offer them."""
    assert options("strategy") == ["auto", "ddp", "ddp_cpu", "fsdp2", "fsdp2_cpu", "gpu"]


@pytest.mark.parametrize("option", options("strategy"))
def test_strategy_options(option):
    cfg = compose_cfg(f"strategy={option}")
    kwargs = build.build_strategy(cfg.strategy)
    assert {"accelerator", "devices", "num_nodes", "strategy"} <= set(kwargs)
    expected = {"auto": str, "gpu": str, "ddp_cpu": DDPStrategy, "ddp": DDPStrategy, "fsdp2_cpu": ModelParallelStrategy,
                "fsdp2": ModelParallelStrategy}
    assert isinstance(kwargs["strategy"], expected[option])
    if option in ("auto", "ddp_cpu", "fsdp2_cpu"):  # the CPU ones build a whole Trainer here
        trainer = pl.Trainer(**kwargs, logger=False, enable_checkpointing=False)
        assert trainer.num_devices == (1 if option == "auto" else 2)


def test_multirun_refuses_a_strategy_that_relaunches_the_command_line(tmp_path):
    def trainer(*overrides):
        return pl.Trainer(**build.build_strategy(compose_cfg(*overrides).strategy), logger=False)

    sweep = RunContext(output_dir=tmp_path, multirun=True, sweep_dir=tmp_path, job_num=0)
    with pytest.raises(ConfigError, match="re-runs the whole sweep"):
        build.check_launch(trainer("strategy=ddp_cpu"), sweep)
    with pytest.raises(ConfigError, match="re-runs the whole sweep"):
        build.check_launch(trainer("strategy=fsdp2_cpu"), sweep)
    build.check_launch(trainer("strategy=ddp_cpu", "strategy.start_method=spawn"), sweep)
    build.check_launch(trainer("strategy=ddp_cpu"), RunContext(output_dir=tmp_path))  # a single run may popen
    build.check_launch(trainer("strategy=auto"), sweep)


@pytest.mark.parametrize("option", options("logger"))
def test_logger_options(option, tmp_path):
    cfg = compose_cfg(f"logger={option}")
    ctx = RunContext(output_dir=tmp_path, choices={"model": "mlp", "data": "digits", "penalty": "l1"})
    logger = build_logger(cfg.logger, cfg, ctx)
    expected = {"none": type(None), "csv": CSVLogger, "tensorboard": TensorBoardLogger, "wandb": WandbLogger}[option]
    assert isinstance(logger, expected)
    log_config(logger, cfg)
    if option == "wandb":
        run = logger.experiment
        assert run.settings.mode in ("offline", "dryrun")
        assert run.name == "mlp-digits-l1" and "penalty:l1" in run.tags
        assert run.config["penalty"]["alpha"] == cfg.penalty.alpha  # the resolved config
        assert "wandb sync" in finish_wandb(logger, {"val/acc": 0.5})
    elif logger is not None:
        assert Path(logger.save_dir) == tmp_path


def test_wandb_mode_switch(monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert wandb_mode(None) == "offline"
    monkeypatch.setenv("WANDB_MODE", "online")
    assert (wandb_mode(None), wandb_mode(True), wandb_mode(False)) == ("online", "offline", "online")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode(None) == "disabled"


@pytest.mark.parametrize("option", options("trainer"))
def test_trainer_options(option):
    cfg = compose_cfg(f"trainer={option}")
    trainer = pl.Trainer(**build.trainer_kwargs(cfg), logger=False)
    assert trainer.max_epochs == cfg.trainer.max_epochs


@pytest.mark.parametrize("option", options("experiment"))
def test_experiment_options(option):
    cfg = compose_cfg(f"experiment={option}")
    data, reg = build.build_data(cfg), build.build_regularizer(cfg.penalty)
    model = build.build_model(cfg, data)
    expected = {
        "lasso_diabetes": ("diabetes", models.Linear, lightreg.L1(0.1)),
        "sparse_mlp_digits": ("digits", models.MLP, lightreg.L1(3e-4)),
        "group_lasso_features": ("synthetic", models.Linear, lightreg.GroupLasso(0.1, dim=1)),
        "feature_selection_digits": ("digits", models.MLP, lightreg.GroupLasso(0.005, dim=1)),
    }[option]
    assert (data.name, type(model), reg.penalty) == expected
    reg.select(model)  # include/exclude globs name real parameters
    if option == "feature_selection_digits":  # prune, then hold the pruned pixels from the step the penalty stops
        (freeze,) = [cb for cb in build.build_callbacks(cfg, RunContext(Path(".")), reg) if isinstance(cb, lightreg.FreezeZeros)]
        assert freeze.start_step == reg.schedule.end == 510 and freeze.include == ("net.0.weight",)


@pytest.mark.parametrize("option", options("hparams_search"))
def test_hparams_search_options(option):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    cfg = compose_cfg(f"hparams_search={option}", hydra=True)
    assert "OptunaSweeper" in cfg.hydra.sweeper._target_
    assert cfg.optimized_metric == "val/acc"
    assert set(cfg.hydra.sweeper.params) == {"penalty.alpha", "penalty.l1_ratio"}
    assert build.build_regularizer(cfg.penalty).penalty.name == "elastic_net"


def test_slurm_launcher_option():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    cfg = compose_cfg("hydra/launcher=slurm", hydra=True)
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
    assert cfg.hydra.launcher.tasks_per_node == 1
    OmegaConf.to_container(cfg.hydra.launcher)  # composes with the plugin's own defaults


def test_missing_required_field_is_reported_by_key():
    from omegaconf.errors import MissingMandatoryValue

    cfg = compose_cfg("penalty.alpha=???")
    with pytest.raises(MissingMandatoryValue, match="penalty.alpha"):
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
