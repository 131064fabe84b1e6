"""A ``_target_``'s keyword arguments and their annotations, read from its source without importing it.

The command line checks a configuration before torch and Lightning load (importing ``lightning.pytorch`` takes
several seconds): every node that names a ``_target_`` (the Trainer, a strategy, a logger, a callback, the
``Regularizer`` and its penalty, a user's own LightningModule and DataModule) is compared with that target's
``__init__``. Importing the target would import torch, so its module is located with ``importlib.util.find_spec``
on the top-level package (which imports nothing) and parsed with :mod:`ast`. The reader follows what a signature
is usually made of: ``from x import Name`` re-exports (also under ``if TYPE_CHECKING:``), base classes while an
``__init__`` passes ``**kwargs`` on, module-level type aliases, ``typing`` and ``X | Y`` annotations. What it
cannot read (a name it cannot find, a class without a readable ``__init__``) it leaves open: the same check runs
again on the imported class (:func:`lightreg.app.validate.check_arguments`) before anything starts.
"""

from __future__ import annotations

import ast
import builtins
import collections.abc
import datetime
import functools
import importlib.util
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Names an annotation may use without an import the reader can follow.
_KNOWN: dict[str, Any] = {
    **{name: getattr(typing, name) for name in ("Any", "Optional", "Union", "Literal", "Callable", "Sequence", "Iterable",
                                                "Mapping", "List", "Dict", "Tuple", "Set", "Type")},
    **{name: getattr(collections.abc, name) for name in ("Sequence", "Iterable", "Mapping", "Callable")},
    **{name: getattr(builtins, name) for name in ("int", "float", "str", "bool", "bytes", "list", "dict", "tuple", "set")},
    "timedelta": datetime.timedelta, "None": None, "Path": Path,
}
_DEPTH = 6  # re-exports and aliases followed before giving up


@dataclass
class Signature:
    """What a target accepts: ``params`` (name -> annotation, ``Any`` when unknown) and ``open`` (``**kwargs`` reach
    a base the reader could not follow, so any keyword may be fine)."""

    params: dict[str, Any] = field(default_factory=dict)
    open: bool = False
    name: str = ""


def module_file(module: str) -> Path | None:
    """The source file of ``module`` (``a.b.c``), found without importing ``a`` or anything under it."""
    top, *rest = module.split(".")
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if not spec.submodule_search_locations:
        return Path(spec.origin) if not rest and spec.origin and spec.origin.endswith(".py") else None
    for base in spec.submodule_search_locations:
        path = Path(base, *rest)
        for candidate in ((path.with_suffix(".py"),) if rest else ()) + (path / "__init__.py",):
            if candidate.is_file():
                return candidate
    return None


@functools.lru_cache(maxsize=256)
def _parse(path: Path) -> ast.Module | None:
    try:
        return ast.parse(path.read_text(encoding="utf-8"))
    except (OSError, SyntaxError, UnicodeDecodeError):
        return None


def _top_level(tree: ast.Module) -> list[ast.stmt]:
    """Module-level statements, with those inside ``if``/``try`` blocks (``TYPE_CHECKING`` imports, fallbacks)."""
    out: list[ast.stmt] = []
    stack = list(tree.body)
    while stack:
        node = stack.pop(0)
        if isinstance(node, ast.If):
            stack[:0] = node.body + node.orelse
        elif isinstance(node, ast.Try):
            stack[:0] = node.body
        else:
            out.append(node)
    return out


def _absolute(module: str, level: int, name: str | None, is_package: bool) -> str:
    if level == 0:
        return name or ""
    parts = module.split(".")
    base = parts if is_package else parts[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def _lookup(module: str, name: str, depth: int = 0) -> tuple[str, ast.AST] | None:
    """``(module, definition)`` of ``name`` as seen from ``module``: a class, a function, or an assigned value."""
    path = module_file(module)
    tree = _parse(path) if path else None
    if tree is None or depth > _DEPTH:
        return None
    is_package = path.name == "__init__.py"
    for node in _top_level(tree):
        if isinstance(node, (ast.ClassDef, ast.FunctionDef)) and node.name == name:
            return module, node
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return module, node.value
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id == name and node.value:
            return module, node.value
        if isinstance(node, ast.ImportFrom):
            for alias in node.names:
                if (alias.asname or alias.name) == name:
                    source = _absolute(module, node.level, node.module, is_package)
                    found = _lookup(source, alias.name, depth + 1)
                    if found is None and module_file(f"{source}.{alias.name}"):
                        return f"{source}.{alias.name}", ast.Module(body=[], type_ignores=[])  # a module
                    return found
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname == name:
                    return alias.name, ast.Module(body=[], type_ignores=[])
                if alias.asname is None and alias.name.split(".")[0] == name:
                    return name, ast.Module(body=[], type_ignores=[])
    return None


def find(target: str) -> tuple[str, ast.AST] | None:
    """The definition of a dotted ``_target_`` (``package.module.Class``, or a name a package re-exports)."""
    parts = target.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        module, names = ".".join(parts[:cut]), parts[cut:]
        if module_file(module) is None:
            continue
        found = _lookup(module, names[0])
        for name in names[1:]:
            if found is None or not isinstance(found[1], ast.Module):
                return None
            found = _lookup(found[0], name)
        return found
    return None


def signature(target: str) -> Signature | None:
    """The keyword arguments of ``target``'s ``__init__`` (a class) or of ``target`` itself (a function); ``None``
    when its source cannot be read.

    Example:
        >>> sig = signature("lightreg.app.data.TabularData")
        >>> sig.params["batch_size"], sig.open
        (typing.Optional[int], False)
    """
    found = find(target)
    if found is None:
        return None
    module, node = found
    out = Signature(name=target.rsplit(".", 1)[-1])
    if isinstance(node, ast.FunctionDef):
        return out if _add_arguments(out, module, node) is not None else out
    if not isinstance(node, ast.ClassDef):
        return None
    _collect(out, module, node, 0)
    return out


def _collect(out: Signature, module: str, cls: ast.ClassDef, depth: int) -> bool | None:
    """Add ``cls``'s ``__init__`` arguments, and its bases' (in order, as the MRO would) while they are reached through
    ``**kwargs``. True: the signature is complete (``out.open`` tells whether any key is fine); None: no ``__init__``
    on this branch, go on to the next base."""
    if depth > _DEPTH:
        out.open = True
        return True
    init = next((n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "__init__"), None)
    if init is not None and not _add_arguments(out, module, init):
        return True  # no **kwargs: the signature ends here
    if init is None and any(_decorator_name(d) == "dataclass" for d in cls.decorator_list):
        for node in cls.body:
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                out.params.setdefault(node.target.id, _annotation(module, node.annotation))
        return True
    for base in cls.bases:
        if isinstance(base, ast.Name) and base.id in ("object", "Generic", "ABC"):
            continue
        if isinstance(base, ast.Subscript):  # Generic[T], Base[T]
            base = base.value
        found = _resolve_expr(module, base)
        if found is None or not isinstance(found[1], ast.ClassDef):
            out.open = True  # a base we cannot read may take any keyword
            return True
        if _collect(out, found[0], found[1], depth + 1):
            return True
    if init is not None and depth == 0:
        out.open = True  # **kwargs that reach no readable __init__: object's, or a C base; leave it open
    return None


def _add_arguments(out: Signature, module: str, fn: ast.FunctionDef) -> bool:
    """Add ``fn``'s keyword-capable arguments; True when it also takes ``**kwargs``."""
    args = fn.args
    positional = args.posonlyargs + args.args
    if positional and positional[0].arg in ("self", "cls"):
        positional = positional[1:]
    for arg in [*positional, *args.kwonlyargs]:
        if arg in args.posonlyargs:
            continue
        out.params.setdefault(arg.arg, _annotation(module, arg.annotation) if arg.annotation else Any)
    return args.kwarg is not None


def _decorator_name(node: ast.expr) -> str:
    node = node.func if isinstance(node, ast.Call) else node
    return node.attr if isinstance(node, ast.Attribute) else getattr(node, "id", "")


def _resolve_expr(module: str, node: ast.expr) -> tuple[str, ast.AST] | None:
    """A ``Name`` or ``a.b.Name`` expression of ``module``, followed to its definition."""
    if isinstance(node, ast.Name):
        return _lookup(module, node.id)
    if isinstance(node, ast.Attribute):
        owner = _resolve_expr(module, node.value)
        if owner is not None and isinstance(owner[1], ast.Module):
            return _lookup(owner[0], node.attr)
    return None


def _annotation(module: str, node: ast.expr | None, depth: int = 0) -> Any:
    """An annotation's AST as a ``typing`` object; ``Any`` for whatever cannot be resolved."""
    if node is None or depth > _DEPTH:
        return Any
    if isinstance(node, ast.Constant):
        if node.value is None:
            return None
        if isinstance(node.value, str):  # a forward reference or a postponed annotation
            try:
                return _annotation(module, ast.parse(node.value, mode="eval").body, depth + 1)
            except SyntaxError:
                return Any
        return Any
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        left, right = _annotation(module, node.left, depth + 1), _annotation(module, node.right, depth + 1)
        return Any if Any in (left, right) else typing.Union[left, right]  # noqa: UP007
    if isinstance(node, ast.Subscript):
        return _subscript(module, node, depth)
    name = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else None
    if isinstance(node, ast.Name) or (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                                      and node.value.id in ("typing", "t", "collections", "abc", "datetime", "builtins")):
        if isinstance(node, ast.Name):
            found = _lookup(module, name)
            if found is not None and not isinstance(found[1], (ast.ClassDef, ast.FunctionDef, ast.Module)):
                return _annotation(found[0], found[1], depth + 1)  # a type alias
            if found is not None and isinstance(found[1], ast.ClassDef):
                return Any  # a class of its own: an instance of it cannot be written in YAML anyway
        if name in _KNOWN:
            return _KNOWN[name]
    return Any


def _subscript(module: str, node: ast.Subscript, depth: int) -> Any:
    origin = _annotation(module, node.value, depth + 1)
    items = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
    if origin is typing.Literal:
        values = [item.value for item in items if isinstance(item, ast.Constant)]
        return typing.Literal[tuple(values)] if len(values) == len(items) else Any
    args = tuple(_annotation(module, item, depth + 1) for item in items)
    if origin in (typing.Optional, typing.Union):
        return Any if Any in args else typing.Union[args] if origin is typing.Union else typing.Optional[args[0]]  # noqa: UP007
    if origin in (list, typing.List, collections.abc.Sequence, typing.Sequence, collections.abc.Iterable, typing.Iterable,
                  set, typing.Set) and len(args) == 1:
        return {typing.List: list, typing.Set: set, typing.Sequence: collections.abc.Sequence,
                typing.Iterable: collections.abc.Iterable}.get(origin, origin)[args[0]]
    if origin in (tuple, typing.Tuple):
        return tuple[args] if args else tuple
    if origin in (dict, typing.Dict, collections.abc.Mapping, typing.Mapping):
        return dict
    return Any
