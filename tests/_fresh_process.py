"""One fresh interpreter for the checks of what the imports load, started once per session: a fresh process pays the
seconds of importing torch and Lightning, and the checks need only one. Each test reads its own lines.

In order: ``import lightreg`` alone (no torch, no Lightning); every public name after Lightning (no app dependency);
then a fit with a ``WeightMonitor`` and a ``CSVLogger`` (no wandb, before or after it).
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import tempfile

from tests._app import ROOT, app_env

SCRIPT = """
import json, sys
APP = ("hydra", "omegaconf", "wandb", "sklearn", "matplotlib")
def say(key, value):
    print("FACT", key, json.dumps(value))
import lightreg
say("BARE", sorted(m for m in ("torch", "lightning", *APP) if m in sys.modules))
import lightning.pytorch  # imports matplotlib itself when it is installed (through torchmetrics)
before = set(sys.modules)
from lightreg import *  # every public name, so every core module
say("ALL", sorted(m for m in APP if m in set(sys.modules) - before))
from lightning.pytorch.loggers import CSVLogger
from lightreg import WeightMonitor
from tests.models import TinyNet, loader, regression_data, trainer
say("WANDB_BEFORE_FIT", "wandb" in sys.modules)
x, y = regression_data()
monitor = WeightMonitor(every_n_steps=1, histogram_every_n_steps=1, print_table=True)
trainer(max_steps=2, logger=CSVLogger(sys.argv[1]), callbacks=[monitor]).fit(TinyNet(), loader(x, y))
say("WANDB_AFTER_FIT", "wandb" in sys.modules)
"""


@functools.cache
def import_facts() -> dict:
    """``{key: value}`` as the fresh process printed them; the process's failure, with its stderr, fails the caller."""
    with tempfile.TemporaryDirectory() as logs:
        result = subprocess.run([sys.executable, "-c", SCRIPT, logs], capture_output=True, text=True, env=app_env(),
                                cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    facts = [line.split(" ", 2)[1:] for line in result.stdout.splitlines() if line.startswith("FACT ")]
    return {key: json.loads(value) for key, value in facts}
