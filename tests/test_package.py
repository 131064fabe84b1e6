"""The package as installed: a lean core, public names imported on first use, one version."""

from __future__ import annotations

import importlib.metadata
import re

import pytest

import lightreg
from tests._app import ROOT
from tests._fresh_process import import_facts


def test_the_core_imports_none_of_the_app_dependencies():
    """``pip install lightreg`` has no hydra, wandb, scikit-learn or matplotlib: the core must not need them (and
    ``import lightreg`` alone loads neither torch nor Lightning). Checked in a fresh process (tests/_fresh_process.py)."""
    facts = import_facts()
    assert (facts["BARE"], facts["ALL"]) == ([], [])


def test_public_names_resolve_and_are_listed():
    assert sorted(lightreg._SOURCES) == sorted(lightreg.__all__)
    for name in lightreg.__all__:
        obj = getattr(lightreg, name)
        assert obj.__name__ == name and obj.__module__ == lightreg._SOURCES[name]
        assert name in dir(lightreg)
    with pytest.raises(AttributeError, match="no attribute 'L3'"):
        lightreg.L3  # noqa: B018


def test_one_version():
    """pyproject.toml reads the version from lightreg.__version__; an installed copy reports the same."""
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in pyproject and 'version = { attr = "lightreg.__version__" }' in pyproject
    assert not re.search(r'^version\s*=\s*"', pyproject, flags=re.M)  # no second, literal version
    assert re.fullmatch(r"\d+\.\d+\.\d+", lightreg.__version__)
    try:
        installed = importlib.metadata.version("lightreg")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("lightreg is not installed here (run from the source tree)")
    assert installed == lightreg.__version__
