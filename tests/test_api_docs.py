"""docs/api.md is the API reference generated from the docstrings: it must cover every public name and be current."""

from __future__ import annotations

import doctest
import importlib.util
import sys

import pytest

import lightreg
from tests._app import ROOT

SCRIPT = ROOT / "scripts" / "api_docs.py"


@pytest.fixture(scope="module")
def api_docs():
    spec = importlib.util.spec_from_file_location("lightreg_api_docs", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_docs_api_md_is_current(api_docs):
    """Fails after a docstring or signature changed without `python scripts/api_docs.py`."""
    assert (ROOT / "docs" / "api.md").read_text() == api_docs.render(), "docs/api.md is stale: python scripts/api_docs.py"


def test_every_public_name_has_a_section_with_its_docstring(api_docs):
    text = api_docs.render()
    for name in lightreg.__all__:
        assert f"\n## `{name}`\n" in text
        first_line = (getattr(lightreg, name).__doc__ or "").strip().splitlines()[0].replace("``", "`")
        assert first_line and first_line in text, name


def test_the_script_examples(api_docs):
    """The script's own doctests (scripts/ is not collected for --doctest-modules)."""
    failures, tried = doctest.testmod(api_docs)
    assert tried >= 2 and failures == 0
