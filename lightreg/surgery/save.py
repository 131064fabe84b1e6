"""Save a shrunk model so that it loads without unpickling code: a ``torch.export`` program.

A shrunk model's widths match no class a user can rebuild from its config, so saving its ``state_dict`` is
not enough, and ``torch.save(module)`` needs ``torch.load(weights_only=False)``, which runs pickled code.
``torch.export`` writes the graph and the weights in its own format; ``torch.export.load`` reads them back
without pickle, and ``.module()`` gives a callable module again.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from torch import nn

from lightreg.model.dependency_groups import as_inputs

REPORT_FILE = "shrink_report.json"


def save_shrunk(module: nn.Module, path: str | os.PathLike[str], example_inputs: Any = None) -> None:
    """Export ``module`` (in eval mode) traced on ``example_inputs`` and write it to ``path`` with its report.

    Args:
        module: the model, e.g. what ``shrink`` returned.
        path: the file to write (``.pt2`` by convention).
        example_inputs: a tensor, tuple or dict of keyword inputs; default: ``module.example_input_array``.
            The first dimension is exported as dynamic (any batch size) where the model allows it.

    Example:
        >>> import tempfile, pathlib
        >>> net = nn.Sequential(nn.Linear(3, 2)).eval()
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "net.pt2"
        >>> save_shrunk(net, path, torch.zeros(4, 3))
        >>> loaded, report = load_shrunk(path)
        >>> torch.equal(loaded(torch.ones(5, 3)), net(torch.ones(5, 3))), report
        (True, None)
    """
    inputs = as_inputs(module, example_inputs)
    args, kwargs = (inputs, {}) if isinstance(inputs, tuple) else ((), inputs) if isinstance(inputs, dict) else ((inputs,), {})
    was_training = module.training
    module.eval()
    try:
        program = _export(module, args, kwargs)
    finally:
        module.train(was_training)
    report = getattr(module, "shrink_report", None)
    extra = {REPORT_FILE: json.dumps(report.to_dict())} if report is not None else {}
    torch.export.save(program, path, extra_files=extra)


def _export(module: nn.Module, args: tuple, kwargs: dict) -> Any:
    batch = torch.export.Dim("batch", min=1)
    tensors = [t for t in list(args) + list(kwargs.values()) if isinstance(t, torch.Tensor)]
    if tensors and all(t.ndim > 0 and t.shape[0] > 1 for t in tensors):
        dynamic = ([{0: batch} if isinstance(a, torch.Tensor) else None for a in args] if args else None,
                   {k: ({0: batch} if isinstance(v, torch.Tensor) else None) for k, v in kwargs.items()} if kwargs else None)
        try:
            shapes = dynamic[0] if args else dynamic[1]
            return torch.export.export(module, args, kwargs, dynamic_shapes=tuple(shapes) if args else shapes)
        except Exception:  # a model that specialises the batch size (a reshape to a constant): export it as is
            pass
    return torch.export.export(module, args, kwargs)


def load_shrunk(path: str | os.PathLike[str]) -> tuple[nn.Module, dict[str, Any] | None]:
    """The module saved by :func:`save_shrunk`, and its shrink report as a dict (``None`` if it had none).

    Reads ``torch.export``'s format: no pickled code runs.
    """
    extra = {REPORT_FILE: ""}
    program = torch.export.load(path, extra_files=extra)
    report = json.loads(extra[REPORT_FILE]) if extra[REPORT_FILE] else None
    return program.module(), report
