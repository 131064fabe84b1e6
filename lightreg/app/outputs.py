"""The files a run writes into its output folder (metrics.json, shrink_report.json), each written whole."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` to ``path`` via a temporary file and ``os.replace``: readers never see half a file.

    Example:
        >>> import tempfile
        >>> p = Path(tempfile.mkdtemp()) / "m.json"
        >>> write_json_atomic(p, {"val/acc": 0.5}); json.loads(p.read_text())
        {'val/acc': 0.5}
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
