"""Run a function on N CPU processes (gloo) as a torchrun-style job, and collect what each rank saved.

The environment variables make Lightning treat the processes as launched externally, so several
``Trainer(strategy=..., devices=N).fit`` calls run one after another inside one job. The processes are
started once per test session and kept: every test module that calls :func:`run_on_ranks` reuses them,
so importing torch and Lightning on each rank is paid once, not once per module. Each call gets a fresh
rendezvous port, and the process group is destroyed after it, as if the ranks were new.
"""

from __future__ import annotations

import atexit
import os
import queue
import socket
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(rank: int, world_size: int, tasks: Any, results: Any) -> None:
    """A rank's loop: take ``(fn, port, out, args)``, run ``fn(rank, *args)``, save its result, report."""
    torch.set_num_threads(1)
    while (task := tasks.get()) is not None:
        fn, port, out, args = task
        os.environ.update(
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world_size), RANK=str(rank),
            LOCAL_RANK=str(rank), NODE_RANK="0", LOCAL_WORLD_SIZE=str(world_size),
        )
        try:
            torch.save(fn(rank, *args), Path(out) / f"rank{rank}.pt")
            results.put((rank, None))
        except BaseException:  # the test reports it; the rank stays available for the next call
            results.put((rank, traceback.format_exc()))
        finally:
            if torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()


class _Ranks:
    """``world_size`` spawned processes waiting for work, and the queues to talk to them."""

    def __init__(self, world_size: int) -> None:
        context = mp.get_context("spawn")
        self.world_size = world_size
        self.tasks = [context.Queue() for _ in range(world_size)]
        self.results = context.Queue()
        self.processes = [context.Process(target=_serve, args=(r, world_size, self.tasks[r], self.results), daemon=True)
                          for r in range(world_size)]
        for process in self.processes:
            process.start()

    def alive(self) -> bool:
        return all(p.is_alive() for p in self.processes)

    def close(self) -> None:
        for task_queue, process in zip(self.tasks, self.processes, strict=True):
            if process.is_alive():
                task_queue.put(None)
        for process in self.processes:
            process.join(timeout=10)
            if process.is_alive():
                process.terminate()


_pools: dict[int, _Ranks] = {}


def _ranks(world_size: int) -> _Ranks:
    pool = _pools.get(world_size)
    if pool is None or not pool.alive():
        pool = _pools[world_size] = _Ranks(world_size)
    return pool


@atexit.register
def _close_all() -> None:
    for pool in _pools.values():
        pool.close()


def run_on_ranks(
    fn: Callable[..., dict], out: Path, *args: Any, world_size: int = 2, timeout: float = 300.0
) -> list[dict]:
    """Call ``fn(rank, *args)`` on ``world_size`` processes; return each rank's returned dict.

    ``fn`` must be importable (a module-level function) and return something ``torch.save`` can write.
    A rank that raises fails the call with its traceback; ranks still running after ``timeout`` seconds
    (a collective one rank never joined) are terminated and ``TimeoutError`` is raised, so CI never hangs.
    """
    out.mkdir(parents=True, exist_ok=True)
    pool = _ranks(world_size)
    port = free_port()
    for task_queue in pool.tasks:
        task_queue.put((fn, port, str(out), args))
    errors: dict[int, str] = {}
    done, deadline = 0, time.monotonic() + timeout
    while done < world_size:
        try:
            rank, error = pool.results.get(timeout=1.0)
        except queue.Empty:
            if time.monotonic() < deadline and pool.alive():
                continue
            what = f"ran past {timeout:.0f}s (a rank is stuck)" if pool.alive() else "lost a rank (it died)"
            pool.close()
            _pools.pop(world_size, None)
            raise TimeoutError(f"{fn.__name__} on {world_size} ranks {what}") from None
        done += 1
        if error is not None:
            errors[rank] = error
    if errors:
        raise RuntimeError("\n".join(f"rank {r} failed:\n{e}" for r, e in sorted(errors.items())))
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world_size)]
