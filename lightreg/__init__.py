"""lightreg: L1, L2, elastic-net and group-lasso penalties for PyTorch Lightning, applied by a callback.

The core (penalties, selection, schedules, statistics) is plain tensor code; the callbacks connect
Lightning hooks to it. Hydra and W&B are used only by the app (``lightreg.app``) and optional extras.

The public names below are imported on first use (PEP 562), so that ``import lightreg`` and the
``lightreg-train`` command line answer ``--help`` or a config error without importing torch or
Lightning. ``from lightreg import L1`` works as usual.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"  # the one version source: pyproject.toml reads it (setuptools dynamic version)

#: Public name -> the module that defines it.
_SOURCES = {
    "L0": "lightreg.l0",
    "L1": "lightreg.elementwise",
    "L2": "lightreg.elementwise",
    "CosineSchedule": "lightreg.schedules",
    "CoupledGroupLasso": "lightreg.coupled_lasso",
    "coupled_groups": "lightreg.dependency_groups",
    "load_shrunk": "lightreg.shrink_save",
    "save_shrunk": "lightreg.shrink_save",
    "TracedShrinkReport": "lightreg.shrink_traced_report",
    "TracedShrinkRow": "lightreg.shrink_traced_report",
    "print_traced_report": "lightreg.shrink_traced_report",
    "ElasticNet": "lightreg.elementwise",
    "FreezeZeros": "lightreg.freeze_zeros",
    "GroupLasso": "lightreg.group_lasso",
    "LinearWarmup": "lightreg.schedules",
    "Penalty": "lightreg.penalty",
    "Regularizer": "lightreg.regularizer",
    "ShrinkReport": "lightreg.shrink_table",
    "ShrinkRow": "lightreg.shrink_table",
    "StepWindow": "lightreg.schedules",
    "WeightMonitor": "lightreg.monitor",
    "print_report": "lightreg.report",
    "print_shrink_report": "lightreg.shrink_table",
    "register_step_rule": "lightreg.step_registry",
    "select_parameters": "lightreg.selection",
    "shrink": "lightreg.shrink",
    "shrink_report": "lightreg.shrink_table",
    "sparsity_report": "lightreg.report",
}

__all__ = [
    "L0",
    "L1",
    "L2",
    "CosineSchedule",
    "CoupledGroupLasso",
    "ElasticNet",
    "FreezeZeros",
    "GroupLasso",
    "LinearWarmup",
    "Penalty",
    "Regularizer",
    "ShrinkReport",
    "ShrinkRow",
    "StepWindow",
    "TracedShrinkReport",
    "TracedShrinkRow",
    "WeightMonitor",
    "coupled_groups",
    "load_shrunk",
    "print_report",
    "print_shrink_report",
    "print_traced_report",
    "register_step_rule",
    "save_shrunk",
    "select_parameters",
    "shrink",
    "shrink_report",
    "sparsity_report",
]

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time __getattr__ below imports on demand
    from lightreg.dependency_groups import coupled_groups
    from lightreg.coupled_lasso import CoupledGroupLasso
    from lightreg.elementwise import L1, L2, ElasticNet
    from lightreg.freeze_zeros import FreezeZeros
    from lightreg.group_lasso import GroupLasso
    from lightreg.l0 import L0
    from lightreg.monitor import WeightMonitor
    from lightreg.penalty import Penalty
    from lightreg.step_registry import register_step_rule
    from lightreg.regularizer import Regularizer
    from lightreg.report import print_report, sparsity_report
    from lightreg.schedules import CosineSchedule, LinearWarmup, StepWindow
    from lightreg.selection import select_parameters
    from lightreg.shrink import shrink
    from lightreg.shrink_save import load_shrunk, save_shrunk
    from lightreg.shrink_table import ShrinkReport, ShrinkRow, print_shrink_report, shrink_report
    from lightreg.shrink_traced_report import TracedShrinkReport, TracedShrinkRow, print_traced_report


def __getattr__(name: str) -> Any:
    module = _SOURCES.get(name)
    if module is None:
        raise AttributeError(f"module 'lightreg' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
