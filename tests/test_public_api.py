"""The public names of ``lightreg`` as they were before the subpackage layout (issue 18): each still importable."""

import importlib

import pytest

import lightreg

#: ``lightreg.__all__`` before the move, written out literally so that a change to ``__init__.py`` cannot hide a loss.
PUBLIC = [
    "L0", "L1", "L2", "CosineSchedule", "CoupledGroupL0", "CoupledGroupLasso", "ElasticNet", "FreezeZeros", "GroupLasso",
    "LinearWarmup", "Penalty", "Regularizer", "ShrinkReport", "ShrinkRow", "StepWindow", "TracedShrinkReport",
    "TracedShrinkRow", "WeightMonitor", "coupled_groups", "load_shrunk", "print_report", "print_shrink_report",
    "print_traced_report", "register_step_rule", "save_shrunk", "select_parameters", "shrink", "shrink_report",
    "sparsity_report",
]


def test_all_is_unchanged():
    assert sorted(lightreg.__all__) == sorted(PUBLIC)


@pytest.mark.parametrize("name", PUBLIC)
def test_each_name_imports_from_lightreg(name):
    value = getattr(importlib.import_module("lightreg"), name)
    namespace: dict = {}
    exec(f"from lightreg import {name}", namespace)
    assert namespace[name] is value
    assert getattr(value, "__module__", "").startswith("lightreg.")  # defined in lightreg, not re-exported from elsewhere


def test_shrink_is_the_function_not_the_module():
    from lightreg import shrink

    assert callable(shrink) and shrink.__name__ == "shrink"
