"""lightreg: L1, L2, elastic-net and group-lasso penalties for PyTorch Lightning, applied by a callback.

The core (penalties, selection, schedules, statistics) is plain tensor code; the callbacks connect
Lightning hooks to it. Hydra and W&B are used only by the app (``lightreg.app``) and optional extras.
"""

from lightreg.freeze_zeros import FreezeZeros
from lightreg.group_lasso import GroupLasso
from lightreg.l0 import L0
from lightreg.monitor import WeightMonitor
from lightreg.penalties import L1, L2, ElasticNet
from lightreg.penalty import Penalty
from lightreg.regularizer import Regularizer
from lightreg.report import print_report, sparsity_report
from lightreg.schedules import CosineSchedule, LinearWarmup, StepWindow
from lightreg.selection import select_parameters
from lightreg.shrink import shrink
from lightreg.shrink_table import ShrinkReport, ShrinkRow, print_shrink_report, shrink_report

__all__ = [
    "L0",
    "L1",
    "L2",
    "CosineSchedule",
    "ElasticNet",
    "FreezeZeros",
    "GroupLasso",
    "LinearWarmup",
    "Penalty",
    "Regularizer",
    "ShrinkReport",
    "ShrinkRow",
    "StepWindow",
    "WeightMonitor",
    "print_report",
    "print_shrink_report",
    "select_parameters",
    "shrink",
    "shrink_report",
    "sparsity_report",
]

__version__ = "0.1.0"
