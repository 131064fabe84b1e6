"""Where ``conf/`` lives, the OmegaConf resolvers it uses, and the run's Hydra context.

``conf/`` sits at the repository top; a wheel ships the same files as ``lightreg/conf`` (a setuptools
``package-dir`` mapping in ``pyproject.toml``), so a source checkout, an editable install and a plain
``pip install .`` all find it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf


class ConfigError(ValueError):
    """A bad configuration: reported as one line and a non-zero exit, without a traceback."""


def config_dir() -> str:
    """The absolute path of the ``conf`` directory: the checkout's if there is one, else the installed copy."""
    here = Path(__file__).resolve()
    for candidate in (here.parents[2] / "conf", here.parents[1] / "conf"):
        if (candidate / "train.yaml").is_file():
            return str(candidate)
    raise FileNotFoundError(f"lightreg's conf/ directory (train.yaml) is neither at {here.parents[2]} nor at {here.parents[1]}")


def alpha_from_log10(log10_alpha: Any, default: Any) -> float:
    """The resolver ``${lightreg.alpha:${.log10_alpha},DEFAULT}``: ``10**log10_alpha``, or ``DEFAULT`` when unset.

    It makes a log-spaced sweep one override: ``penalty.log10_alpha=range(-5,-1)`` runs alpha =
    1e-5, 1e-4, 1e-3, 1e-2 (``range`` stops before its end; a step of 0.5 gives half decades).

    Example:
        >>> alpha_from_log10(-3, 0.5), alpha_from_log10(None, 0.5)
        (0.001, 0.5)
    """
    if log10_alpha is None:
        return default
    if isinstance(log10_alpha, bool) or not isinstance(log10_alpha, (int, float)) or not math.isfinite(log10_alpha):
        raise ConfigError(f"penalty.log10_alpha must be a finite number, got {log10_alpha!r}")
    return float(f"{10.0 ** log10_alpha:.12g}")  # 1e-05, not 1.0000000000000001e-05


def register_resolvers() -> None:
    """Register ``lightreg.alpha`` once per process (compose, the app and the plot script all need it)."""
    if not OmegaConf.has_resolver("lightreg.alpha"):
        OmegaConf.register_new_resolver("lightreg.alpha", alpha_from_log10)


@dataclass
class RunContext:
    """What a run needs to know about Hydra: its output dir, whether it is one job of a sweep, its name."""

    output_dir: Path
    multirun: bool = False
    sweep_dir: Path | None = None
    job_num: int | None = None
    overrides: str = ""
    choices: dict[str, str] = field(default_factory=dict)
    config_name: str = "train"

    @classmethod
    def from_hydra(cls, cfg: DictConfig | None = None) -> RunContext:
        """Read Hydra's runtime config; outside ``@hydra.main`` (the compose API) use the cwd."""
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if not HydraConfig.initialized():
            choices = {}
            if cfg is not None and "hydra" in cfg:
                choices = {k: str(v) for k, v in cfg.hydra.runtime.choices.items() if not k.startswith("hydra/")}
            return cls(output_dir=Path(os.getcwd()), choices=choices)
        hc = HydraConfig.get()
        multirun = hc.mode == RunMode.MULTIRUN
        return cls(
            output_dir=Path(hc.runtime.output_dir),
            multirun=multirun,
            sweep_dir=Path(hc.sweep.dir) if multirun else None,
            job_num=hc.job.num if multirun else None,
            overrides=hc.job.override_dirname,
            choices={k: str(v) for k, v in hc.runtime.choices.items() if not k.startswith("hydra/")},
            config_name=str(hc.job.config_name),
        )

    @property
    def name(self) -> str:
        """A readable job name: the overrides, or model-data-penalty when there are none."""
        base = self.overrides or "-".join(self.choices.get(k, "?") for k in ("model", "data", "penalty"))
        return f"{self.job_num}:{base}" if self.job_num is not None else base

    @property
    def group(self) -> str | None:
        """One W&B group per sweep (named after its directory); ``None`` for a single run."""
        if self.sweep_dir is None:
            return None
        return "sweep-" + "-".join(self.sweep_dir.parts[-2:])
