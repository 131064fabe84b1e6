"""Load a script of scripts/ as a module, for tests of its pure parts."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str) -> ModuleType:
    """``scripts/<name>.py`` imported as the module ``lightreg_<name>`` (registered: dataclasses look it up)."""
    spec = importlib.util.spec_from_file_location(f"lightreg_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def run_script(name: str, *args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """``python scripts/<name>.py ARGS`` in its own process, as a user runs it; output captured as text."""
    return subprocess.run([sys.executable, str(ROOT / "scripts" / f"{name}.py"), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)
