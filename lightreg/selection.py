"""Which parameters a penalty or the monitor sees: one default rule, then include/exclude globs.

The default (nanoGPT/timm) rule: every trainable parameter with ``ndim >= 2`` that does not belong to
a normalisation layer. Biases, norm scales and frozen parameters are never selected by default.
``include`` replaces the rule with exactly the names it matches; ``exclude`` removes names. Names are
the ones the user wrote: wrapper prefixes added by ``torch.compile`` or FSDP are stripped first.
"""

from __future__ import annotations

from collections.abc import Sequence
from fnmatch import fnmatchcase

from torch import Tensor, nn

from lightreg._checks import check_patterns

#: Module names that wrappers insert into parameter names (``torch.compile``, FSDP, activation checkpointing).
WRAPPER_TOKENS = ("_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module")

_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.RMSNorm,
)


def clean_name(name: str) -> str:
    """Drop wrapper tokens so ``_orig_mod.net.0.weight`` reads ``net.0.weight``.

    Example:
        >>> clean_name("_fsdp_wrapped_module.layers._orig_mod.0.weight")
        'layers.0.weight'
    """
    return ".".join(part for part in name.split(".") if part not in WRAPPER_TOKENS)


def is_norm_layer(module: nn.Module) -> bool:
    """Normalisation layers by type, and custom ones (``RMSNorm``, ``LlamaRMSNorm``...) by class name."""
    return isinstance(module, _NORM_TYPES) or "norm" in type(module).__name__.lower()


def is_default_parameter(module: nn.Module, param: Tensor) -> bool:
    """The default rule for a parameter owned directly by ``module``."""
    return param.requires_grad and param.ndim >= 2 and not is_norm_layer(module)


def named_parameters_with_owner(model: nn.Module) -> list[tuple[str, nn.Module, Tensor]]:
    """``(clean name, owning module, parameter)`` for each distinct parameter, in registration order."""
    seen: set[int] = set()
    rows = []
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            full = f"{module_name}.{param_name}" if module_name else param_name
            rows.append((clean_name(full), module, param))
    return rows


def _matching(names: Sequence[str], patterns: tuple[str, ...], argument: str) -> set[str]:
    matched: set[str] = set()
    for pattern in patterns:
        hits = {n for n in names if fnmatchcase(n, pattern)}
        if not hits:
            shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
            raise ValueError(f"{argument} pattern {pattern!r} matches no parameter name; names are: {shown}")
        matched |= hits
    return matched


def select_parameters(
    model: nn.Module,
    include: Sequence[str] | str | None = None,
    exclude: Sequence[str] | str | None = None,
) -> list[tuple[str, Tensor]]:
    """Return ``(name, parameter)`` pairs chosen by the default rule or ``include``, minus ``exclude``.

    Patterns are shell globs (``fnmatch``) matched against the whole clean name, e.g. ``"encoder.*"``,
    ``"*.weight"``. A pattern that matches nothing, or a selection that ends up empty, raises
    ``ValueError`` naming it: a typo must not silently switch the penalty off.

    Example:
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 1))
        >>> [name for name, _ in select_parameters(model)]
        ['0.weight', '2.weight']
        >>> [name for name, _ in select_parameters(model, include=["*.bias"], exclude="2.*")]
        ['0.bias', '1.bias']
    """
    include = check_patterns("include", include)
    exclude = check_patterns("exclude", exclude)
    rows = named_parameters_with_owner(model)
    names = [name for name, _, _ in rows]
    if include is None:
        chosen = {name for name, module, param in rows if is_default_parameter(module, param)}
    else:
        chosen = _matching(names, include, "include")
    if exclude is not None:
        chosen -= _matching(names, exclude, "exclude")
    if not chosen:
        raise ValueError(
            f"the selection is empty (include={list(include) if include else None}, "
            f"exclude={list(exclude) if exclude else None}): no parameter would be affected"
        )
    return [(name, param) for name, _, param in rows if name in chosen]
