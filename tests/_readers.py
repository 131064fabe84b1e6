"""Read back what a run wrote, independently of the code that wrote it: Lightning's CSV log and W&B's offline log."""

from __future__ import annotations

import csv
import json
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

BLOCK, HEADER = 32768, 7  # the LevelDB log format W&B writes its run-<id>.wandb file in


def read_csv(where: Any) -> list[dict[str, str]]:
    """The rows of a ``CSVLogger``'s ``metrics.csv``: ``where`` is the logger, or a folder holding one such file."""
    log_dir = getattr(where, "log_dir", None)
    path = Path(log_dir) / "metrics.csv" if log_dir is not None else None
    if path is None:
        (path,) = Path(where).glob("**/metrics.csv")
    with open(path) as f:
        return list(csv.DictReader(f))


def wandb_records(path: str | Path) -> Iterator[Any]:
    """Yield the protobuf ``Record`` s of a ``.wandb`` file (LevelDB log: 32 KiB blocks of chunks)."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:HEADER])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), "not a W&B run log"
    pos, buf = HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        if length == 0 and kind == 0:  # zero padding up to the block's end
            pos += left
            continue
        if pos + HEADER + length > len(data):  # a chunk still being written
            return
        chunk = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        buf = chunk if kind in (1, 2) else buf + chunk  # FULL/FIRST start a record, MIDDLE/LAST extend it
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(buf)
            yield record


def finished_wandb_records(path: str | Path, timeout: float = 60.0) -> list[Any]:
    """The records once the run's ``exit`` record is on disk: ``wandb.finish`` can return before the
    W&B service has flushed the file."""
    deadline = time.monotonic() + timeout
    while True:
        records = list(wandb_records(path))
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def items(entries: Any) -> dict[str, Any]:
    """``{key: value}`` of a history, summary or config record's items (nested keys joined with ``/``)."""
    return {(e.key or "/".join(e.nested_key)): json.loads(e.value_json) for e in entries}


def wandb_run(job_dir: Path) -> dict[str, Any]:
    """The single offline W&B run under ``job_dir/wandb``: its ``run`` and ``exit`` records, the set of
    ``history`` keys, the ``summary`` and the ``config``, and its ``dir``."""
    (run_dir,) = (Path(job_dir) / "wandb").glob("offline-run-*")
    (log_file,) = run_dir.glob("run-*.wandb")
    out: dict[str, Any] = {"history": set(), "summary": {}, "config": {}, "dir": run_dir}
    for record in finished_wandb_records(log_file):
        kind = record.WhichOneof("record_type")
        if kind in ("run", "exit"):
            out[kind] = getattr(record, kind)
        elif kind == "history":
            out["history"] |= set(items(record.history.item))
        elif kind == "summary":
            out["summary"].update(items(record.summary.update))
        elif kind == "config":
            out["config"].update({item.key: json.loads(item.value_json) for item in record.config.update})
    return out
