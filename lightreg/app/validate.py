"""Check a config node's keys and values against the signature of the class it configures, before building it.

Lightning's ``Trainer`` stores most of its arguments without looking at them: ``max_epochs="abc"`` fails
only inside ``fit``, after the W&B run and the sanity check have started. The app therefore compares
every node that becomes an object (``trainer``, ``data``, ``model``, ``strategy``, ``logger``) with that
object's ``__init__`` annotations first, and reports the first mismatch as one line naming the key.
"""

from __future__ import annotations

import collections.abc
import datetime
import difflib
import inspect
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any

from lightreg.app.config import ConfigError

_EMPTY = inspect.Parameter.empty


def parameters(fn: Callable[..., Any]) -> tuple[dict[str, Any], bool]:
    """``({name: annotation}, open)`` of ``fn``'s keyword arguments; a class is read through its ``__init__``
    and, while those take ``**kwargs``, its bases' (``open`` is True when any keyword is accepted in the end).

    Example:
        >>> class Base:
        ...     def __init__(self, lr: float = 0.1) -> None: ...
        >>> class Net(Base):
        ...     def __init__(self, depth: int = 2, **kwargs) -> None: ...
        >>> names, open_ = parameters(Net)
        >>> sorted(names), open_
        (['depth', 'lr'], False)
    """
    functions = [c.__dict__["__init__"] for c in fn.__mro__ if "__init__" in c.__dict__] if inspect.isclass(fn) else [fn]
    found: dict[str, Any] = {}
    for function in functions:
        hints = _annotations(function)
        var_keyword = False
        for name, param in inspect.signature(function).parameters.items():
            if param.kind is param.VAR_KEYWORD:
                var_keyword = True
            elif param.kind is not param.VAR_POSITIONAL and name != "self":
                found.setdefault(name, hints.get(name, _EMPTY))
        if not var_keyword:
            return found, False
    return found, True


def check_arguments(fn: Callable[..., Any], kwargs: Mapping[str, Any], where: str) -> None:
    """Raise :class:`ConfigError` for a key ``fn`` does not take, or a value its annotation rules out.

    Example:
        >>> def fit(max_epochs: int | None = None, precision: typing.Literal["32-true", "64-true"] = "32-true"): ...
        >>> check_arguments(fit, {"max_epochs": 3, "precision": "64-true"}, "trainer")
        >>> check_arguments(fit, {"max_epochs": "abc"}, "trainer")
        Traceback (most recent call last):
        ...
        lightreg.app.config.ConfigError: trainer.max_epochs must be int or null, got 'abc'
        >>> check_arguments(fit, {"max_epoch": 3}, "trainer")
        Traceback (most recent call last):
        ...
        lightreg.app.config.ConfigError: trainer.max_epoch is not an argument of fit (did you mean max_epochs?)
    """
    known, open_ = parameters(fn)
    check_keys(known, open_, kwargs, where, fn.__name__)


def check_keys(known: Mapping[str, Any], open_: bool, kwargs: Mapping[str, Any], where: str, owner: str) -> None:
    """:func:`check_arguments` on a signature already read: ``known`` = {name: annotation}, ``open_`` = takes any key."""
    for key, value in kwargs.items():
        if key not in known:
            if open_:
                continue
            close = difflib.get_close_matches(key, list(known), n=3)
            hint = f"did you mean {', '.join(close)}?" if close else f"it takes {', '.join(sorted(known))}"
            raise ConfigError(f"{where}.{key} is not an argument of {owner} ({hint})")
        hint = known[key]
        if hint is not _EMPTY and not matches(value, hint):
            raise ConfigError(f"{where}.{key} must be {describe(hint)}, got {value!r}")


def matches(value: Any, hint: Any) -> bool:
    """Whether ``value`` (a plain config value, or an object already built) fits the annotation ``hint``.

    Unknown kinds of annotation (callables, type variables, protocols) accept anything: the check only
    refuses what certainly cannot work.

    Example:
        >>> matches(3, float), matches(True, int), matches("abc", typing.Optional[int]), matches([0, 1], list[int])
        (True, False, False, True)
    """
    if hint is Any or hint is _EMPTY or isinstance(value, dict) and "_target_" in value:  # built later by Hydra
        return True
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(matches(value, arg) for arg in args)
    if origin is typing.Literal:
        return any(value == arg and type(value) is type(arg) for arg in args)
    if hint is type(None) or hint is None:
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is datetime.timedelta:
        return isinstance(value, datetime.timedelta)
    if origin in (list, tuple, set, collections.abc.Sequence, collections.abc.Iterable):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple, set)):
            return False
        item = args[0] if args and (origin is not tuple or len(args) == 2 and args[1] is Ellipsis) else Any
        return all(matches(v, item) for v in value)
    if origin in (dict, collections.abc.Mapping):
        return isinstance(value, dict)
    if inspect.isclass(hint) and hint.__module__ not in ("typing", "collections.abc"):
        return isinstance(value, hint)
    return True  # callables, protocols, type variables: not decidable from a config value


def describe(hint: Any) -> str:
    """A short reading of an annotation for an error message.

    Example:
        >>> describe(typing.Optional[int]), describe(typing.Literal["a", "b"])
        ('int or null', "one of 'a', 'b'")
    """
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        words = [describe(a) for a in args if a is not type(None)] + (["null"] if type(None) in args else [])
        return " or ".join(words)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if hint is type(None):
        return "null"
    if origin is not None:
        return f"a {getattr(origin, '__name__', str(origin))}"
    return getattr(hint, "__name__", str(hint))


def _annotations(fn: Callable[..., Any]) -> dict[str, Any]:
    """``fn``'s resolved annotations; one that names something imported only for type checkers is left out."""
    try:
        return typing.get_type_hints(fn)
    except Exception:  # a TYPE_CHECKING-only name in one annotation: resolve the others one by one
        pass
    namespace = getattr(inspect.unwrap(fn), "__globals__", {})
    hints = {}
    for name, annotation in getattr(fn, "__annotations__", {}).items():
        try:
            hints[name] = eval(annotation, namespace) if isinstance(annotation, str) else annotation  # noqa: S307
        except Exception:
            continue
    return hints
