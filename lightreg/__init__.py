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

#: Public name -> the module that defines it; in the order of ``__all__``, the one list of public names.
_SOURCES = {
    "L0": "lightreg.penalties.l0",
    "L1": "lightreg.penalties.elastic_net",
    "L2": "lightreg.penalties.elastic_net",
    "CosineSchedule": "lightreg.penalties.schedules",
    "CoupledGroupL0": "lightreg.penalties.coupled_group_l0",
    "CoupledGroupLasso": "lightreg.penalties.coupled_group_lasso",
    "ElasticNet": "lightreg.penalties.elastic_net",
    "FreezeZeros": "lightreg.callbacks.freeze_zeros",
    "GroupLasso": "lightreg.penalties.group_lasso",
    "LinearWarmup": "lightreg.penalties.schedules",
    "Penalty": "lightreg.penalties.contract",
    "Regularizer": "lightreg.callbacks.regularizer",
    "ShrinkReport": "lightreg.surgery.report",
    "ShrinkRow": "lightreg.surgery.report",
    "StepWindow": "lightreg.penalties.schedules",
    "TracedShrinkReport": "lightreg.surgery.traced_report",
    "TracedShrinkRow": "lightreg.surgery.traced_report",
    "WeightMonitor": "lightreg.callbacks.monitor",
    "coupled_groups": "lightreg.model.dependency_groups",
    "load_shrunk": "lightreg.surgery.save",
    "print_report": "lightreg.stats.report",
    "print_shrink_report": "lightreg.surgery.report",
    "print_traced_report": "lightreg.surgery.traced_report",
    "register_step_rule": "lightreg.proximal.step_registry",
    "save_shrunk": "lightreg.surgery.save",
    "select_parameters": "lightreg.model.selection",
    "shrink": "lightreg.surgery.shrink",
    "shrink_report": "lightreg.surgery.report",
    "sparsity_report": "lightreg.stats.report",
}

__all__ = list(_SOURCES)

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time __getattr__ below imports on demand
    from lightreg.model.dependency_groups import coupled_groups
    from lightreg.penalties.coupled_group_l0 import CoupledGroupL0
    from lightreg.penalties.coupled_group_lasso import CoupledGroupLasso
    from lightreg.penalties.elastic_net import L1, L2, ElasticNet
    from lightreg.callbacks.freeze_zeros import FreezeZeros
    from lightreg.penalties.group_lasso import GroupLasso
    from lightreg.penalties.l0 import L0
    from lightreg.callbacks.monitor import WeightMonitor
    from lightreg.penalties.contract import Penalty
    from lightreg.proximal.step_registry import register_step_rule
    from lightreg.callbacks.regularizer import Regularizer
    from lightreg.stats.report import print_report, sparsity_report
    from lightreg.penalties.schedules import CosineSchedule, LinearWarmup, StepWindow
    from lightreg.model.selection import select_parameters
    from lightreg.surgery.shrink import shrink
    from lightreg.surgery.save import load_shrunk, save_shrunk
    from lightreg.surgery.report import ShrinkReport, ShrinkRow, print_shrink_report, shrink_report
    from lightreg.surgery.traced_report import TracedShrinkReport, TracedShrinkRow, print_traced_report


def __getattr__(name: str) -> Any:
    module = _SOURCES.get(name)
    if module is None:
        raise AttributeError(f"module 'lightreg' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
