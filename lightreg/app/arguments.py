"""The built-in models' and data's argument checks, torch-free: the constructors call them, and so does the
command line before torch loads (:mod:`lightreg.app.preflight`), so a bad ``model.momentum`` is one line at once.

Each function raises ``ValueError`` naming the argument and the value.
"""

from __future__ import annotations

from typing import Any

ACTIVATIONS = ("gelu", "relu", "tanh")
OPTIMIZERS = ("adam", "adamw", "sgd")
TASKS = ("classification", "regression")
DATASETS = ("digits", "breast_cancer", "diabetes", "synthetic")


def _int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def check_task_model(task: Any = "classification", optimizer: Any = "adam", lr: Any = 1e-3, weight_decay: Any = 0.0,
                     momentum: Any = 0.0, **_: Any) -> None:
    """``TaskModel``'s arguments.

    Example:
        >>> check_task_model(momentum=1.5)
        Traceback (most recent call last):
        ...
        ValueError: momentum must be in [0, 1), got 1.5
    """
    if task not in TASKS:
        raise ValueError(f"task must be 'classification' or 'regression', got {task!r}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {sorted(OPTIMIZERS)}, got {optimizer!r}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
    if not weight_decay >= 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
    if not 0 <= momentum < 1:
        raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")


def check_mlp(depth: Any = 2, width: Any = 64, dropout: Any = 0.0, activation: Any = "relu", **kwargs: Any) -> None:
    """``MLP``'s own arguments, then ``TaskModel``'s."""
    _int("depth", depth, 0)
    _int("width", width, 1)
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    check_task_model(**kwargs)


def check_cnn(channels: Any = 8, dropout: Any = 0.0, **kwargs: Any) -> None:
    """``CNN``'s own arguments, then ``TaskModel``'s."""
    _int("channels", channels, 1)
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    check_task_model(**kwargs)


def check_linear(zero_init: Any = False, **kwargs: Any) -> None:
    """``Linear``'s arguments (``zero_init`` is typed by its annotation), then ``TaskModel``'s."""
    check_task_model(**kwargs)


def check_tabular(name: Any = "digits", batch_size: Any = 64, val_fraction: Any = 0.2, test_fraction: Any = 0.2,
                  n_features: Any = 50, n_informative: Any = 5, **_: Any) -> None:
    """``TabularData``'s arguments.

    Example:
        >>> check_tabular(val_fraction=0.5, test_fraction=0.5)
        Traceback (most recent call last):
        ...
        ValueError: val_fraction=0.5 and test_fraction=0.5 must be in (0, 1) with sum < 1
    """
    if name not in DATASETS:
        raise ValueError(f"data name must be one of {list(DATASETS)}, got {name!r}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive int or None (full batch), got {batch_size!r}")
    if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"val_fraction={val_fraction} and test_fraction={test_fraction} must be in (0, 1) with sum < 1")
    if name == "synthetic" and not 0 < n_informative <= n_features:
        raise ValueError(f"n_informative must be in [1, n_features={n_features}], got {n_informative}")


#: ``_target_`` -> its torch-free check, for the command line's preflight.
CHECKS = {
    "lightreg.app.models.Linear": check_linear,
    "lightreg.app.models.MLP": check_mlp,
    "lightreg.app.models.CNN": check_cnn,
    "lightreg.app.data.TabularData": check_tabular,
}
