"""Small C kernels compiled at first use with the system's C compiler and loaded with ``ctypes``.

lightreg's fused CPU kernels (the elementwise and the group prox in an adaptive metric, the one-pass gradient and
decoupled steps) are plain C99 functions over raw pointers: compiling one takes about a second (no torch headers),
against the 5-30 s of an inductor kernel, and the library is cached on disk (a folder private to the user) by the hash
of its source, compiler, flags and CPU, so later processes only load it. ``-O3 -march=native`` vectorises the loops for the machine that runs them (the library is
built there); ``-fno-math-errno`` lets ``sqrt`` vectorise; ``-ffp-contract=off`` keeps every operation rounded as
written, so a kernel rounds as the eager torch code it replaces (``fma`` where torch's ``add(alpha=)`` and
``addcmul`` fuse). ``ctypes`` releases the GIL during a call.

A missing or failing compiler raises ``CompileError``; the callers then warn once and keep their eager reference.
A large tensor's rows are split over ``torch.get_num_threads()`` threads (:func:`split`), as torch's own ops are.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import torch

FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-ffp-contract=off", "-fopenmp-simd", "-shared", "-fPIC")

#: A tensor is split over the threads only from this many elements per thread on (a thread's start costs about that).
PARALLEL_ELEMENTS = 1 << 16

_loaded: dict[str, ctypes.CDLL] = {}
_pools: dict[int, ThreadPoolExecutor] = {}
R = TypeVar("R")


class CompileError(RuntimeError):
    """No C compiler, or it failed on a kernel's source."""


def compiler() -> str:
    """The C compiler: ``$CC``, else ``cc``."""
    name = os.environ.get("CC", "cc")
    path = shutil.which(name)
    if path is None:
        raise CompileError(f"no C compiler {name!r} on PATH (set CC)")
    return path


def cache_folder() -> Path:
    """Where the built libraries are kept: ``$LIGHTREG_KERNEL_CACHE``, else ``lightreg/kernels`` in the user's cache
    folder (``$XDG_CACHE_HOME``, else ``~/.cache``): private to the user, and kept across reboots."""
    if os.environ.get("LIGHTREG_KERNEL_CACHE"):
        return Path(os.environ["LIGHTREG_KERNEL_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lightreg" / "kernels"


def _fallback_folder() -> Path:
    user = os.getuid() if hasattr(os, "getuid") else 0
    return Path(tempfile.gettempdir()) / f"lightreg-kernels-{user}"


def private_folder(folder: Path) -> Path:
    """``folder``, made if missing (readable by its owner only), checked to be the user's own and writable by no one
    else: a library loaded from it runs as the user, so nobody else may have placed it there."""
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = folder.stat()
    except OSError as error:  # read-only home, a file in the way, /proc...
        raise CompileError(f"cannot use the kernel cache {folder} ({error}); set LIGHTREG_KERNEL_CACHE") from error
    if hasattr(os, "getuid") and (info.st_uid != os.getuid() or info.st_mode & 0o022):
        raise CompileError(f"the kernel cache {folder} is not private (owner uid {info.st_uid}, mode "
                           f"{oct(info.st_mode & 0o777)}); set LIGHTREG_KERNEL_CACHE to a folder of your own")
    return folder


def usable_cache_folder() -> Path:
    """:func:`cache_folder`, private; where the default one cannot be used (a read-only home in a container), a
    private per-user folder in the temporary directory instead. A ``$LIGHTREG_KERNEL_CACHE`` is used as given."""
    try:
        return private_folder(cache_folder())
    except CompileError:
        if os.environ.get("LIGHTREG_KERNEL_CACHE"):
            raise
        return private_folder(_fallback_folder())


def machine() -> str:
    """What the built code depends on besides its source: the platform and the CPU's instruction sets (the libraries
    are built with ``-march=native``, so one built on another CPU, through a shared home, must not be loaded)."""
    flags = platform.processor()
    try:
        with open("/proc/cpuinfo") as info:
            flags = next((line for line in info if line.startswith(("flags", "Features"))), flags)
    except OSError:
        pass
    return "\0".join([sys.platform, platform.machine(), flags])


def library_path(name: str, source: str, folder: Path | None = None) -> Path:
    """The file of the library built from ``source``: by the hash of the source, the compiler, the flags and the
    machine (:func:`machine`)."""
    cc = compiler()
    key = hashlib.sha256("\0".join([source, cc, *FLAGS, machine()]).encode()).hexdigest()[:16]
    return (folder or cache_folder()) / f"{name}_{key}.so"


def _build(cc: str, name: str, source: str, target: Path) -> None:
    with tempfile.TemporaryDirectory(dir=target.parent) as work:  # other processes may build it at the same time
        src, built = Path(work) / f"{name}.c", Path(work) / f"{name}.so"
        src.write_text(source)
        done = subprocess.run([cc, *FLAGS, str(src), "-o", str(built), "-lm"], capture_output=True, text=True)
        if done.returncode != 0:
            raise CompileError(f"{cc} failed on {name}: {done.stderr.strip()[-2000:]}")
        os.replace(built, target)


def load(name: str, source: str) -> ctypes.CDLL:
    """The library built from ``source`` (built at the first call in any process, then loaded from the disk cache).

    Example:
        >>> lib = load("doctest_add", "double add(double a, double b) { return a + b; }")
        >>> lib.add.restype, lib.add.argtypes = ctypes.c_double, [ctypes.c_double, ctypes.c_double]
        >>> lib.add(1.5, 2.0)
        3.5
    """
    cc = compiler()
    target = library_path(name, source, usable_cache_folder())
    if str(target) in _loaded:
        return _loaded[str(target)]
    if not target.exists():
        try:
            _build(cc, name, source, target)
        except OSError as error:  # a full disk, a compiler that cannot run
            raise CompileError(f"building {name} in {target.parent} failed: {error}") from error
    try:
        lib = ctypes.CDLL(str(target))
    except OSError as error:
        raise CompileError(f"cannot load {target}: {error}") from error
    _loaded[str(target)] = lib
    return lib


def split(rows: int, row_size: int, run: Callable[[int, int], R]) -> list[R]:
    """``run(lo, hi)`` over ranges that cover ``range(rows)``: one per thread (``torch.get_num_threads()``, at most
    one per ``PARALLEL_ELEMENTS`` elements), run in parallel (a ``ctypes`` call releases the GIL); their results.

    Example:
        >>> split(10, 1, lambda lo, hi: hi - lo)  # a small tensor: one range
        [10]
    """
    threads = min(torch.get_num_threads(), rows, max(1, rows * row_size // PARALLEL_ELEMENTS))
    if threads <= 1:
        return [run(0, rows)]
    bounds = [rows * i // threads for i in range(threads + 1)]
    pool = _pools.get(threads) or _pools.setdefault(threads, ThreadPoolExecutor(threads, thread_name_prefix="lightreg"))
    return list(pool.map(lambda i: run(bounds[i], bounds[i + 1]), range(threads)))
