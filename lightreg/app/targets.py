"""Build one config node into its ``_target_``, after checking the node against the target's signature."""

from __future__ import annotations

from typing import Any

from hydra.utils import get_class, get_method, instantiate
from omegaconf import DictConfig, OmegaConf

from lightreg.app.validate import check_arguments


def _container(node: DictConfig) -> dict[str, Any]:
    out = OmegaConf.to_container(node, resolve=True, throw_on_missing=True)
    assert isinstance(out, dict)
    return out


def _callable(target: str) -> Any:
    try:
        return get_class(target)
    except ValueError:  # a function (a factory) rather than a class
        return get_method(target)


def build_target(node: DictConfig, where: str, drop: tuple[str, ...] = (), **extra: Any) -> Any:
    """``instantiate(node, **extra)`` without the keys ``drop``, after checking the node's keys and values
    against its ``_target_``'s signature."""
    kwargs = {k: v for k, v in _container(node).items() if k not in drop}
    target = kwargs.pop("_target_")
    check_arguments(_callable(target), kwargs, where)
    return instantiate({"_target_": target, **kwargs}, **extra, _convert_="all")
