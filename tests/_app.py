"""Running the app in tests: compose a config, call the command line in this process, or start it as a user does."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: Short settings for a run that only has to go through every stage: 2 epochs of 3 batches, no checkpoint files.
FAST = ("trainer=debug", "callbacks=monitor", "callbacks.monitor.every_n_steps=2", "progress_bar=false")
#: In this process, leave Python logging alone: Hydra's configs would rebind or disable the test's loggers.
NO_LOGGING = ("hydra/job_logging=none", "hydra/hydra_logging=none")


def compose_cfg(*overrides: str, hydra: bool = False):
    """The composed ``train`` config (Hydra's compose API: no run, no output dir)."""
    from hydra import compose, initialize_config_dir

    from lightreg.app.config import config_dir, register_resolvers

    register_resolvers()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=hydra)


#: Set in this process by Lightning when a test launched ranks from it; a user's shell has none of them, and a
#: MASTER_PORT inherited by two runs at once makes both bind the same port.
DISTRIBUTED_ENV = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "LOCAL_WORLD_SIZE")


def app_env() -> dict[str, str]:
    """The environment of a command-line run: this checkout first on the path, W&B offline."""
    path = [str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": os.pathsep.join(path)}
    for name in ("HYDRA_FULL_ERROR", *DISTRIBUTED_ENV):
        env.pop(name, None)
    return env


#: ``lightreg-train`` as a new process: ``python -m lightreg`` runs the console script's own ``main``.
COMMAND = (sys.executable, "-m", "lightreg")



def run_main(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> int:
    """``lightreg-train ARGV`` in this process (no interpreter start); returns its exit status."""
    from lightreg.app.cli import main

    monkeypatch.setattr(sys, "argv", ["lightreg-train", *argv])
    try:
        main()
    except SystemExit as exit_info:
        return 0 if exit_info.code is None else int(exit_info.code)
    return 0


@pytest.fixture
def fresh_hydra():
    """Run ``@hydra.main`` in this process, then undo its global state so later tests (Lightning's launchers
    look at ``HydraConfig``, caplog at the loggers) see a process that never ran Hydra."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    root = logging.getLogger()
    saved = (root.level, list(root.handlers))
    GlobalHydra.instance().clear()
    yield
    GlobalHydra.instance().clear()
    HydraConfig.instance().cfg = None
    root.setLevel(saved[0])
    root.handlers[:] = saved[1]
