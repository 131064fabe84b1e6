"""Training progress for a log file or a pipe: one line per epoch instead of a redrawn bar.

tqdm redraws its bar in place with carriage returns; on a terminal that is one line, but written to a
file, a pipe or a CI log it becomes lines of thousands of characters. Off a terminal the app uses
:class:`EpochLines` instead.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ProgressBar

log = logging.getLogger("lightreg.app")


def say(line: str) -> None:
    """Log ``line`` on the app's logger (Hydra's console and ``train.log``), or print it where nobody configured
    logging (a rank started by spawn, ``hydra/job_logging=none``, ``run`` called from Python)."""
    if log.hasHandlers():
        log.info(line)
    else:
        print(line, flush=True)


def format_metrics(metrics: dict[str, Any]) -> str:
    """``key=value`` pairs, numbers to 4 significant digits, in the order given.

    Example:
        >>> format_metrics({"train/loss": 0.123456, "val/acc": 0.98, "v_num": "x1"})
        'train/loss=0.1235  val/acc=0.98  v_num=x1'
    """
    return "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())


#: How many of a model's logged metrics a progress line shows when it logs none with ``prog_bar=True``.
FALLBACK_METRICS = 6


def fallback_metrics(logged: dict[str, Any]) -> dict[str, float]:
    """Up to ``FALLBACK_METRICS`` scalar metrics of ``logged`` (``trainer.callback_metrics``): the model's own first,
    then lightreg's summaries (``reg/<name>/<metric>``, ``weights/global/...``), never its per-layer ones.

    Example:
        >>> import torch
        >>> fallback_metrics({"reg/l1/sparsity": 0.1, "weights/net.0.weight/l1": 2.0, "loss": torch.tensor(0.5)})
        {'loss': 0.5, 'reg/l1/sparsity': 0.1}
    """
    scalars = {k: float(v) for k, v in logged.items()
               if isinstance(v, (int, float)) or getattr(v, "numel", lambda: 0)() == 1}
    lightreg = [k for k in scalars if k.startswith(("reg/", "weights/"))]
    summaries = [k for k in lightreg if (k.startswith("reg/") and k.count("/") == 2) or k.startswith("weights/global/")]
    keys = [k for k in scalars if k not in lightreg] + summaries
    return {k: scalars[k] for k in keys[:FALLBACK_METRICS]}


class EpochLines(ProgressBar):
    """A progress "bar" that logs one line after every ``every_n_epochs``-th epoch (and the last), on rank zero.

    A line reads like the checkpoint it matches: ``epoch=14 step=255  train/loss=0.01  val/acc=0.98  (8.1 s)``
    (epochs counted from 0, as in Lightning's checkpoint names), with the metrics the model logs with
    ``prog_bar=True``, or, where it logs none that way, the first of those it logs (:func:`fallback_metrics`). Lines go through :func:`say`, so Hydra's job log receives them too.
    """

    def __init__(self, every_n_epochs: int = 1) -> None:
        super().__init__()
        if isinstance(every_n_epochs, bool) or not isinstance(every_n_epochs, int) or every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be an int >= 1, got {every_n_epochs!r}")
        self.every_n_epochs = every_n_epochs
        self._enabled = True
        self._pending: int | None = None  # the epoch that runs now; reported when the next one starts
        self._start = 0.0

    @classmethod
    def for_epochs(cls, max_epochs: int | None, lines: int = 20) -> EpochLines:
        """About ``lines`` lines for a run of ``max_epochs`` epochs (one per epoch up to that many).

        Example:
            >>> EpochLines.for_epochs(15).every_n_epochs, EpochLines.for_epochs(300).every_n_epochs
            (1, 15)
        """
        return cls(max(1, math.ceil(max_epochs / lines)) if max_epochs and max_epochs > 0 else 1)

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start, self._pending = time.perf_counter(), None

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The epoch's train metrics are reduced after its on_train_epoch_end hooks: report it once they are.
        self._report(trainer, pl_module, last=False)
        self._pending = trainer.current_epoch

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._report(trainer, pl_module, last=True)

    def _report(self, trainer: pl.Trainer, pl_module: pl.LightningModule, last: bool) -> None:
        epoch, self._pending = self._pending, None
        if epoch is None or not self._enabled or not trainer.is_global_zero:
            return
        if not last and (epoch + 1) % self.every_n_epochs:
            return
        metrics = {k: v for k, v in self.get_metrics(trainer, pl_module).items() if k != "v_num"}
        if not metrics:  # a model that logs nothing with prog_bar=True: what it logs at all, the first few
            metrics = fallback_metrics(trainer.callback_metrics)
        elapsed = time.perf_counter() - self._start
        say(f"epoch={epoch} step={trainer.global_step}  {format_metrics(metrics)}  ({elapsed:.1f} s)")
