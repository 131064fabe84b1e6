"""``lightreg-train`` (and ``python -m lightreg``): the command line around :func:`lightreg.app.train.run`.

    lightreg-train                                    # MLP on digits, elastic net, proximal
    lightreg-train model=linear data=diabetes penalty=l1 penalty.alpha=0.05
    lightreg-train -m penalty=l1,elastic_net 'penalty.log10_alpha=range(-5,0)'   # a log-spaced sweep

This module imports only Hydra, OmegaConf and the app's config code: ``--help``, ``--cfg job`` and a
mistyped override answer without importing torch or Lightning, which a run imports when it starts.

Exit status: 0 done; 2 a bad configuration (one line on stderr, nothing started; ``HYDRA_FULL_ERROR=1``
shows the traceback); 1 a failure during training (with its traceback); 143 stopped by SIGTERM (the W&B
run is marked failed, no ``metrics.json``; in a sweep the remaining jobs do not run).

A configuration error is found in two passes: Hydra's composition and :func:`lightreg.app.preflight.preflight`
before torch loads (an unknown option, key or value: about a second), then the build of the objects (what only the
model itself can tell, such as a glob that matches none of its parameters).
"""

from __future__ import annotations

import importlib.util
import os
import signal
import sys
import warnings
from typing import Any

#: Import names of the ``app`` extra's packages (``pip install 'lightreg[app]'``).
APP_PACKAGES = ("hydra", "omegaconf", "wandb", "sklearn")
SIGTERM_EXIT = 128 + signal.SIGTERM


def fail(message: str, status: int = 2) -> None:
    """One line on stderr and exit ``status``."""
    print(f"lightreg-train: error: {message}", file=sys.stderr)
    sys.exit(status)


def missing_app_packages() -> list[str]:
    """The ``app`` extra's packages that are not installed (found without importing them)."""
    return [name for name in APP_PACKAGES if importlib.util.find_spec(name) is None]


def _short(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    lines = [line for line in text.splitlines() if line.strip()][:6]
    return "\n  ".join(lines)


def _stopped_by_sigterm(err: BaseException) -> bool:
    """Lightning turns SIGTERM into ``SIGTERMException``, a ``SystemExit`` without a code (exit status 0)."""
    exceptions = sys.modules.get("lightning.pytorch.utilities.exceptions")  # loaded if a run has started
    return exceptions is not None and isinstance(err, exceptions.SIGTERMException)


def run_or_exit(cfg: Any, ctx: Any = None) -> float | None:
    """``run`` with a bad configuration turned into one line and exit status 2, SIGTERM into exit status 143.

    Returns ``cfg.optimized_metric``'s final value, for a sweeper such as Optuna.
    """
    from lightreg.app.config import ConfigError, RunContext
    from lightreg.app.preflight import preflight

    ctx = ctx or RunContext.from_hydra(cfg)
    try:
        preflight(cfg, ctx.multirun, ctx.config_name)
        from lightreg.app.train import run  # torch and Lightning: only now that a run really starts

        metrics = run(cfg, ctx)
    except ConfigError as err:
        _abort_wandb(1)
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        fail(f"{_short(err)} (HYDRA_FULL_ERROR=1 shows the traceback)")
    except BaseException as err:
        if _stopped_by_sigterm(err):
            _abort_wandb(SIGTERM_EXIT)
            print("lightreg-train: stopped by SIGTERM", file=sys.stderr)
            sys.exit(SIGTERM_EXIT)
        _abort_wandb(1)
        raise
    name = cfg.get("optimized_metric")
    if not name:
        return None
    if name not in metrics:
        fail(f"optimized_metric {name!r} is not among the final metrics: {sorted(metrics)}")
    return metrics[name]


def _in_job(cfg: Any) -> float | None:
    """The task Hydra runs: an exception that leaves it is a failure of the run, not of the configuration."""
    try:
        return run_or_exit(cfg)
    except Exception as err:
        err._lightreg_in_job = True  # type: ignore[attr-defined]
        raise


def _builtin_options(group: str) -> list[str]:
    """The options the app ships for ``group`` (Hydra's list-valued defaults error names none)."""
    from pathlib import Path

    from lightreg.app.config import config_dir

    return sorted(p.stem for p in (Path(config_dir()) / group).glob("*.yaml"))


def one_line(err: BaseException) -> str:
    """Hydra's composition errors as one line that names the option or key and lists the valid ones.

    Example:
        >>> from hydra.errors import MissingConfigException
        >>> one_line(MissingConfigException("In 'train': Could not find 'penalty/l3'", "penalty/l3", ["l1", "l2"]))
        'penalty=l3 is not an option of penalty (valid: l1, l2)'
    """
    from hydra.errors import MissingConfigException
    from omegaconf import DictConfig

    if isinstance(err, MissingConfigException) and err.missing_cfg_file and err.options is not None:
        group, _, option = err.missing_cfg_file.rpartition("/")
        if group:
            return f"{group}={option} is not an option of {group} (valid: {', '.join(err.options)})"
        return f"no config named {option!r} (valid: {', '.join(err.options)})"
    text = str(err).strip()
    cause = err.__cause__
    if text.startswith("Could not override '") and cause is not None:
        key = text.split("'")[1]
        parent = getattr(cause, "parent_node", None)
        if isinstance(parent, DictConfig):
            valid = sorted(k for k in parent if k != "hydra")
            node = key.rpartition(".")[0] or "the config"
            return f"{key} is not a key of {node} (valid: {', '.join(map(str, valid))}); +{key}=... adds one"
    if text.startswith("In '") and "Could not load '" in text:  # an option inside a list: callbacks=[default,nope]
        group, _, option = text.split("Could not load '")[1].split("'")[0].rpartition("/")
        return f"{group}={option} is not an option of {group} (valid: {', '.join(_builtin_options(group))})"
    if text.startswith("Could not append to config. An item is already at '"):
        key = text.split("'")[1]
        return f"{key} is already a key of the config: set it without the +, {key}=..."
    return text.splitlines()[0] if text else type(err).__name__


def _report(original: Any, func: Any) -> Any:
    """Hydra's ``run_and_report``, with configuration errors as one line and exit status 2."""
    try:
        return func()
    except Exception as err:
        if getattr(err, "_lightreg_in_job", False) or os.environ.get("HYDRA_FULL_ERROR") == "1":
            def again() -> None:
                raise err

            return original(again)  # Hydra's own report: the traceback, exit status 1
        fail(f"{one_line(err)}")


def _abort_wandb(exit_code: int) -> None:
    """Finish any open W&B run as failed (``exit_code`` != 0), so the next job of a sweep starts a fresh one; wandb is
    not imported for it (a configuration error found before any run started has none to finish)."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish(exit_code=exit_code)


def main() -> None:
    """The ``lightreg-train`` console script and ``python -m lightreg``."""
    missing = missing_app_packages()
    if missing:
        fail(f"the app needs packages that are not installed ({', '.join(missing)}): pip install 'lightreg[app]'")
    import hydra

    from lightreg.app.config import config_dir, register_resolvers

    # Lightning 2.6 on torch 2.13 warns about its own use of a deprecated pytree API: noise in every run.
    for category in (DeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=category)
    register_resolvers()
    # Your package next to your config dir: `_target_: mypkg.Model` is found from the current directory, as with
    # `python -m`, after the installed packages (a console script's sys.path does not hold the current directory).
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())
    import hydra._internal.utils as hydra_utils

    original = hydra_utils.run_and_report
    hydra_utils.run_and_report = lambda func: _report(original, func)
    try:
        hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")(_in_job)()
    finally:
        hydra_utils.run_and_report = original
