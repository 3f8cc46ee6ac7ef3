"""Which thread runs torch's OpenMP pool: in a serving process, one owner thread; every other thread serial.

GNU OpenMP (torch's CPU runtime) lets a team's idle workers spin between parallel regions only while the
process's OpenMP threads, every team's together, fit the CPUs. Past that it throttles the spin to about a
thousand iterations, so the workers sleep on a futex between regions and each region pays a wake-up. Each
thread that runs a parallel torch op gets its own team, and keeps it until it exits. In a deployment
worker on 2 CPUs, a second team was enough: the main thread's (it loaded the model) or an executor
thread's (it prepared a hot-load). The engine thread's SmolLM2-135M decode step then took 45-60 ms
instead of 33-35 at batch 1, and 238 instead of 174 ms at batch 64.

So a serving process calls `serial()` on its main thread before any torch work, gives its engine thread
the pool (`own_pool(n)` there), and runs every other torch call through `run_serial`. One
thread-count quirk makes the explicit calls necessary: `torch.set_num_threads` sets the calling thread's
count and also the default of threads that first touch torch later.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import ParamSpec, TypeVar

import torch

P = ParamSpec("P")
R = TypeVar("R")


def serial() -> None:
    """Run this thread's torch ops on itself alone: it never starts an OpenMP team."""
    if torch.get_num_threads() != 1:
        torch.set_num_threads(1)


def own_pool(threads: int) -> None:
    """Make this thread the one whose torch ops use `threads` OpenMP threads."""
    torch.set_num_threads(max(1, threads))


def run_serial(fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
    """`fn(*args, **kwargs)` with this thread's torch ops serial (for `asyncio.to_thread` and pools)."""
    serial()
    return fn(*args, **kwargs)


@contextlib.contextmanager
def threads_for(threads: int) -> Iterator[None]:
    """Run this thread's torch ops on `threads` threads for the duration, then restore its count."""
    before = torch.get_num_threads()
    if before == threads:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
