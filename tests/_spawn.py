"""Run a function on N CPU processes (gloo) as a torchrun-style job, and collect what each rank saved.

The environment variables make Lightning treat the processes as launched externally, so several
``Trainer(strategy=..., devices=N).fit`` calls run one after another inside one spawn: the start-up cost
(importing torch and Lightning on every rank) is paid once per test module, not once per fit.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn: Callable[..., dict], world_size: int, port: int, out: str, args: tuple) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world_size), RANK=str(rank),
        LOCAL_RANK=str(rank), NODE_RANK="0", LOCAL_WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(1)
    result = fn(rank, *args)
    torch.save(result, Path(out) / f"rank{rank}.pt")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def run_on_ranks(
    fn: Callable[..., dict], out: Path, *args: Any, world_size: int = 2, timeout: float = 300.0
) -> list[dict]:
    """Call ``fn(rank, *args)`` on ``world_size`` spawned processes; return each rank's returned dict.

    ``fn`` must be importable (a module-level function) and return something ``torch.save`` can write.
    A rank that raises fails the call with its traceback; ranks still running after ``timeout`` seconds
    (a collective one rank never joined) are terminated and ``TimeoutError`` is raised, so CI never hangs.
    """
    out.mkdir(parents=True, exist_ok=True)
    context = mp.spawn(_entry, args=(fn, world_size, free_port(), str(out), args), nprocs=world_size, join=False)
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1.0):
        if time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.terminate()
            raise TimeoutError(f"{fn.__name__} on {world_size} ranks ran past {timeout:.0f}s (a rank is stuck)")
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world_size)]
