"""Check a composed config before torch and Lightning load: every configuration error in about a second.

``lightreg-train`` calls :func:`preflight` on each job's config first. It refuses, as one
:class:`~lightreg.app.config.ConfigError`:

* a top-level key the app does not know (``+foo=1``), with the valid ones;
* a ``???`` left unset, an interpolation that does not resolve;
* in every node that names a ``_target_`` (``data``, ``model``, ``penalty`` and its ``Regularizer`` keys,
  ``strategy``, ``logger``, ``trainer``, each of ``callbacks``): a key its signature does not take, a value its
  annotation rules out (signatures read from the source, :mod:`lightreg.app.signatures`);
* a value out of range for lightreg's penalties and ``Regularizer`` (:mod:`lightreg.app.rules`) and for the
  app's own models and data (:mod:`lightreg.app.arguments`), in the constructors' words;
* a multirun whose strategy would re-launch the command line in every rank.

What only the built objects can tell (a glob that matches no parameter of the model, a user's own model refusing a
value, a GPU strategy without a GPU) is found when the run builds them, still before anything starts.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lightreg.app import arguments, rules
from lightreg.app.config import ConfigError, config_dir
from lightreg.app.signatures import signature
from lightreg.app.validate import check_keys

TRAINER = "lightning.pytorch.Trainer"
REGULARIZER = "lightreg.Regularizer"
WANDB = "lightning.pytorch.loggers.WandbLogger"
#: Keys of a node that the app itself consumes (see lightreg.app.build).
APP_KEYS = {"data": ("epochs",), "penalty": ("log10_alpha",), "strategy": ("accelerator", "devices", "num_nodes", "name")}
#: Strategies whose default launcher re-runs the command line for each rank.
RELAUNCHING = ("lightning.pytorch.strategies.DDPStrategy", "lightning.pytorch.strategies.ModelParallelStrategy")


def known_top_level_keys() -> list[str]:
    """The top-level keys of ``conf/train.yaml`` and its config groups (``hydra`` included)."""
    primary = OmegaConf.load(f"{config_dir()}/train.yaml")
    groups = [next(iter(d)) for d in primary.get("defaults", []) if isinstance(d, Mapping)]
    return sorted({*(k for k in primary if k != "defaults"), *(g for g in groups if "/" not in g and " " not in g), "hydra"})


def preflight(cfg: DictConfig, multirun: bool = False, config_name: str = "train") -> None:
    """Raise :class:`ConfigError` for the first configuration error in ``cfg`` (see the module's docstring)."""
    if config_name == "train":
        known = known_top_level_keys()
        unknown = sorted(k for k in cfg if k not in known)
        if unknown:
            raise ConfigError(f"{unknown[0]} is not a key of the config (valid: {', '.join(k for k in known if k != 'hydra')})")
    try:
        plain = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as err:
        raise ConfigError(_omegaconf_message(err)) from err
    assert isinstance(plain, dict)
    plain.pop("hydra", None)
    for where in ("data", "model", "logger"):
        check_node(plain.get(where), where)
    check_penalty(plain.get("penalty"))
    check_strategy(plain.get("strategy"), multirun)
    trainer = plain.get("trainer") or {}
    check_signature(TRAINER, trainer, "trainer")
    for key, node in (plain.get("callbacks") or {}).items():
        check_node(node, f"callbacks.{key}")


def _omegaconf_message(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None)
    first = str(err).strip().splitlines()[0]
    return f"{key}: {first}" if key and key not in first else first


def check_signature(target: str, kwargs: Mapping[str, Any], where: str) -> None:
    """Keys and annotated types of ``kwargs`` against ``target``'s signature, when its source can be read."""
    sig = signature(target)
    if sig is not None:
        check_keys(sig.params, sig.open, kwargs, where, sig.name)


def check_node(node: Any, where: str) -> None:
    """A ``_target_`` node: its keys and types, then the value rules the app knows for that target."""
    if not isinstance(node, dict) or node.get("_target_") is None:
        return
    kwargs = {k: v for k, v in node.items() if k != "_target_" and k not in APP_KEYS.get(where, ())}
    if node["_target_"] == WANDB:
        kwargs.pop("offline", None)  # the app's own switch (null: WANDB_MODE), see lightreg.app.tracking
    check_signature(node["_target_"], kwargs, where)
    check = arguments.CHECKS.get(node["_target_"])
    if check is not None:
        try:
            check(**kwargs)
        except ValueError as err:
            raise ConfigError(f"{where}: {err}") from err


def regularizer_keys() -> tuple[str, ...]:
    """The ``Regularizer``'s arguments besides the penalty, read from its signature in the source."""
    sig = signature(REGULARIZER)
    assert sig is not None, "lightreg/callbacks/regularizer.py is always readable"
    return tuple(k for k in sig.params if k != "penalty")


def check_penalty(node: Any) -> None:
    """The penalty's arguments and the ``Regularizer``'s, split by the ``Regularizer``'s signature."""
    if not isinstance(node, dict) or node.get("_target_") is None:
        return
    target = node["_target_"]
    names = regularizer_keys()
    penalty = {k: v for k, v in node.items() if k not in names and k != "_target_" and k not in APP_KEYS["penalty"]}
    reg = {k: v for k, v in node.items() if k in names and v is not None}
    check_signature(target, penalty, "penalty")
    check_signature(REGULARIZER, reg, "penalty")
    if target in rules.PENALTIES:
        for key, message in rules.penalty_errors(target, penalty) + rules.regularizer_errors(target, penalty, reg):
            raise ConfigError(f"penalty.{message}" if message.startswith(key) else f"penalty.{key}: {message}")


def check_strategy(node: Any, multirun: bool) -> None:
    """The strategy's own arguments; in a multirun, a strategy that re-runs the command line per rank is refused."""
    if not isinstance(node, dict):
        return
    check_node(node, "strategy")
    trainer_keys = {k: node[k] for k in APP_KEYS["strategy"][:3] if k in node}
    check_signature(TRAINER, trainer_keys, "strategy")
    devices = node.get("devices", 1)
    several = devices == -1 or devices == "auto" or (isinstance(devices, int) and devices > 1) or isinstance(devices, list) and len(devices) > 1
    if multirun and node.get("_target_") in RELAUNCHING and node.get("start_method", "popen") == "popen" and several:
        raise ConfigError(
            f"strategy {node['_target_'].rsplit('.', 1)[-1]} re-launches the command line in every rank, which in a "
            "multirun (-m) re-runs the whole sweep per rank (Hydra #2070). Use strategy.start_method=spawn "
            "(strategy=ddp_cpu or ddp), run the jobs one by one without -m, or use hydra/launcher=slurm."
        )
