"""``lightreg-train`` (and ``python -m lightreg``): the command line around :func:`lightreg.app.train.run`.

    lightreg-train                                    # MLP on digits, elastic net, proximal
    lightreg-train model=linear data=diabetes penalty=l1 penalty.alpha=0.05
    lightreg-train -m penalty=l1,elastic_net 'penalty.log10_alpha=range(-5,0)'   # a log-spaced sweep

This module imports only Hydra, OmegaConf and the app's config code: ``--help``, ``--cfg job`` and a
mistyped override answer without importing torch or Lightning, which a run imports when it starts.

Exit status: 0 done; 2 a bad configuration (one line on stderr, nothing started; ``HYDRA_FULL_ERROR=1``
shows the traceback); 1 a failure during training (with its traceback); 143 stopped by SIGTERM (the W&B
run is marked failed, no ``metrics.json``; in a sweep the remaining jobs do not run).
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
    from lightreg.app.train import run  # torch and Lightning: only now that a run really starts

    ctx = ctx or RunContext.from_hydra(cfg)
    try:
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


def _abort_wandb(exit_code: int) -> None:
    from lightreg.app.tracking import abort_wandb

    abort_wandb(exit_code)


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
    hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")(run_or_exit)()
