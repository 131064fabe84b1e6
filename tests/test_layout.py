"""The subpackage layout of docs/development.md: each folder imports only the folders its row allows (lazy imports
included), so there is no import cycle between folders; no module is over 350 lines."""

import ast
from pathlib import Path

import pytest

LIB = Path(__file__).resolve().parents[1] / "lightreg"
#: folder -> the folders it may import (docs/development.md, "Layout").
ALLOWED = {
    "base": set(),
    "model": {"base"},
    "stats": {"base", "model"},
    "penalties": {"base", "model"},
    "proximal": {"base", "model", "stats", "penalties"},
    "surgery": {"base", "model"},
    "callbacks": {"base", "model", "stats", "penalties", "proximal"},
}
MODULES = sorted(p for p in LIB.rglob("*.py") if "__pycache__" not in p.parts)


def imported(path: Path) -> set[str]:
    """The ``lightreg`` modules and names ``path`` imports anywhere (inside functions too)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "lightreg"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "lightreg":
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return out


@pytest.mark.parametrize("folder", sorted(ALLOWED))
def test_a_folder_imports_only_the_layers_below_it(folder):
    wrong = []
    for path in sorted((LIB / folder).glob("*.py")):
        for name in imported(path):
            parts = name.split(".")
            target = parts[1] if len(parts) > 2 else None  # lightreg.<folder>.<...>; `from lightreg import X` has none
            if target is None or (target != folder and target not in ALLOWED[folder]):
                wrong.append(f"{path.relative_to(LIB)} imports {name}")
    assert wrong == []


def test_every_module_sits_in_a_folder_and_none_is_over_350_lines():
    top = sorted(p.name for p in LIB.glob("*.py"))
    assert top == ["__init__.py", "__main__.py"]
    long = {str(p.relative_to(LIB)): n for p in MODULES if (n := len(p.read_text().splitlines())) > 350}
    assert long == {}
