"""Which parameters a penalty or the monitor sees: one default rule, then include/exclude globs.

The default (nanoGPT/timm) rule: every floating-point (or complex) parameter with ``ndim >= 2`` that is
not owned by a normalisation layer and is not a weight-norm magnitude. Integer parameters never train, so
the rule skips them; complex ones are selected so that the callbacks, which support real tensors only,
refuse them by name rather than skip them silently. Normalisation layers are recognised by type:
``torch.nn.modules.normalization`` (``LayerNorm``, ``GroupNorm``, ``RMSNorm``, ``LocalResponseNorm``...)
and ``_NormBase`` (every ``BatchNorm``/``InstanceNorm``); a custom norm layer is an ordinary module to
the rule, so leave it out with ``exclude``. ``requires_grad`` does not matter: a frozen parameter is
selected, and penalised from the step at which its optimizer steps it. A lazy module's parameter is
decided once it materialises. ``include`` replaces the rule with exactly the names it matches;
``exclude`` removes names. Names are the ones the user wrote: wrapper prefixes added by
``torch.compile`` or FSDP are stripped, and a pruned ``weight_orig`` keeps its name ``weight``.
"""

from __future__ import annotations

from collections.abc import Sequence
from fnmatch import fnmatchcase
from typing import NamedTuple

from torch import Tensor, nn
from torch.nn.utils.parametrizations import _WeightNorm
from torch.nn.utils.parametrize import ParametrizationList
from torch.nn.utils.prune import BasePruningMethod
from torch.nn.utils.weight_norm import WeightNorm

from lightreg.base.checks import check_patterns
from lightreg.base.wrapped import is_uninitialized
from lightreg.model.masked import Masked

#: Module names that wrappers insert into parameter names (``torch.compile``, FSDP, activation checkpointing).
WRAPPER_TOKENS = ("_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module")

NORM_TYPES: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._NormBase,) + tuple(
    cls for cls in vars(nn.modules.normalization).values()
    if isinstance(cls, type) and issubclass(cls, nn.Module) and cls is not nn.Module
)


class Owned(NamedTuple):
    """A parameter with its clean name, its owning module and its attribute name there (``weight``)."""

    name: str
    module: nn.Module
    attr: str
    param: Tensor


def clean_name(name: str) -> str:
    """Drop wrapper tokens so ``_orig_mod.net.0.weight`` reads ``net.0.weight``.

    Example:
        >>> clean_name("_fsdp_wrapped_module.layers._orig_mod.0.weight")
        'layers.0.weight'
    """
    return ".".join(part for part in name.split(".") if part not in WRAPPER_TOKENS)


def is_norm_layer(module: nn.Module) -> bool:
    """Normalisation layers by type (``NORM_TYPES``), never by class name.

    Example:
        >>> class SurfaceNormalHead(nn.Linear): pass
        >>> is_norm_layer(nn.BatchNorm1d(3)), is_norm_layer(nn.RMSNorm(3)), is_norm_layer(SurfaceNormalHead(2, 2))
        (True, True, False)
    """
    return isinstance(module, NORM_TYPES)


def pruned_attrs(module: nn.Module) -> set[str]:
    """Names of ``module``'s tensors reparametrised by ``torch.nn.utils.prune`` (``weight`` = ``weight_orig * weight_mask``)."""
    hooks = module._forward_pre_hooks.values()
    return {h._tensor_name for h in hooks if isinstance(h, BasePruningMethod)}


def is_magnitude(module: nn.Module, attr: str) -> bool:
    """Whether ``attr`` is a weight-norm magnitude ``g`` (``weight_g``, or a parametrisation's ``original0``)."""
    if isinstance(module, ParametrizationList):
        return attr == "original0" and isinstance(module[0], _WeightNorm)
    hooks = module._forward_pre_hooks.values()
    return any(isinstance(h, WeightNorm) and attr == f"{h.name}_g" for h in hooks)


def named_parameters_with_owner(model: nn.Module) -> list[Owned]:
    """:class:`Owned` rows for each distinct parameter, in registration order."""
    seen: set[int] = set()
    rows = []
    for module_name, module in model.named_modules():
        pruned = pruned_attrs(module)
        for attr, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            if attr.endswith("_orig") and attr[: -len("_orig")] in pruned:
                attr = attr[: -len("_orig")]
            full = f"{module_name}.{attr}" if module_name else attr
            rows.append(Owned(clean_name(full), module, attr, param))
    return rows


def is_default_parameter(row: Owned) -> bool:
    """The default rule: floating point or complex, ``ndim >= 2``, outside norm layers, no weight-norm magnitude."""
    p = row.param
    return (
        not is_uninitialized(p) and (p.is_floating_point() or p.is_complex()) and p.ndim >= 2
        and not is_norm_layer(row.module) and not is_magnitude(row.module, row.attr)
    )


def effective_tensor(row: Owned) -> Tensor | Masked:
    """The tensor the module computes with: ``orig * mask`` for a pruned weight, else the parameter."""
    if row.attr in pruned_attrs(row.module) and row.module._parameters.get(f"{row.attr}_orig") is row.param:
        return Masked(row.param, getattr(row.module, f"{row.attr}_mask"))
    return row.param


def sparse_gradient_parameters(model: nn.Module) -> set[int]:
    """Ids of the weights of ``Embedding``/``EmbeddingBag`` layers built with ``sparse=True``."""
    return {id(m.weight) for m in model.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse}


def describe_selection(model: nn.Module, selected: Sequence[tuple[str, Tensor]], held: set[int]) -> str:
    """A report of ``selected``: a count line, then one line per tensor with its shape and what it waits for.

    ``held`` holds the ids of the parameters some optimizer holds. Lazy parameters are listed last.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 3), nn.LazyLinear(1))
        >>> _ = net[0].requires_grad_(False)
        >>> print(describe_selection(net, select_parameters(net), held=set()))
        1 tensors, 6 weights
          0.weight  (3, 2)  (not yet trainable, in no optimizer yet)
          lazy, decided once materialised: 1.weight, 1.bias
    """
    lines = [f"{len(selected)} tensors, {sum(p.numel() for _, p in selected if not is_uninitialized(p)):,} weights"]
    for name, p in selected:
        notes = [note for note, on in (("lazy: not materialised yet", is_uninitialized(p)),
                                       ("not yet trainable", not p.requires_grad), ("in no optimizer yet", id(p) not in held)) if on]
        shape = "" if is_uninitialized(p) else f"{tuple(p.shape)}"
        lines.append(f"  {name}  {shape}" + (f"  ({', '.join(notes)})" if notes else ""))
    lazy = [row.name for row in named_parameters_with_owner(model) if is_uninitialized(row.param)]
    return "\n".join(lines + ([f"  lazy, decided once materialised: {', '.join(lazy)}"] if lazy else []))


def _matching(names: Sequence[str], patterns: tuple[str, ...], argument: str) -> set[str]:
    matched: set[str] = set()
    for pattern in patterns:
        hits = {n for n in names if fnmatchcase(n, pattern)}
        if not hits:
            shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
            raise ValueError(f"{argument} pattern {pattern!r} matches no parameter name; names are: {shown}")
        matched |= hits
    return matched


def select_rows(
    model: nn.Module, include: Sequence[str] | str | None = None, exclude: Sequence[str] | str | None = None
) -> list[Owned]:
    """The :class:`Owned` rows of :func:`select_parameters`."""
    include = check_patterns("include", include)
    exclude = check_patterns("exclude", exclude)
    rows = named_parameters_with_owner(model)
    names = [row.name for row in rows]
    excluded = _matching(names, exclude, "exclude") if exclude is not None else set()
    if include is None:
        chosen = {row.name for row in rows if is_default_parameter(row)}
        undecided = [row.name for row in rows if is_uninitialized(row.param) and row.name not in excluded]
    else:
        chosen, undecided = _matching(names, include, "include"), []
    chosen -= excluded
    if not chosen and not undecided:
        raise ValueError(
            f"the selection is empty (include={None if include is None else list(include)}, "
            f"exclude={None if exclude is None else list(exclude)}): no parameter would ever be affected"
        )
    return [row for row in rows if row.name in chosen]


def select_parameters(
    model: nn.Module,
    include: Sequence[str] | str | None = None,
    exclude: Sequence[str] | str | None = None,
) -> list[tuple[str, Tensor]]:
    """Return ``(name, parameter)`` pairs chosen by the default rule or ``include``, minus ``exclude``.

    Patterns are shell globs (``fnmatch``) matched against the whole clean name, e.g. ``"encoder.*"``,
    ``"*.weight"``. A pattern that matches nothing raises ``ValueError`` naming it: a typo must not
    silently switch the penalty off. So does an empty selection, unless a lazy parameter that the
    default rule may still select has yet to materialise.

    Example:
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 1))
        >>> [name for name, _ in select_parameters(model)]
        ['0.weight', '2.weight']
        >>> [name for name, _ in select_parameters(model, include=["*.bias"], exclude="2.*")]
        ['0.bias', '1.bias']
    """
    return [(row.name, row.param) for row in select_rows(model, include, exclude)]
