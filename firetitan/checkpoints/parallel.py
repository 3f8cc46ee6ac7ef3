"""Per-tensor snapshot work (XOR + shuffle + zstd, digests) spread over a small, bounded thread pool.

The work releases the GIL where it is heavy (numpy XOR and copies, zstd, hashlib), so threads run it
in parallel. Tensors are handed out largest first so one big embedding does not finish last alone.
$FIRETITAN_SNAPSHOT_THREADS sets the pool size; the default is 1 (no pool) up to 3 CPUs and half the
CPUs, at most 4, above: on this 2-core machine under load, 2 threads were no faster than 1
(`benchmarks/results/delta_threads.json`); more cores were not measured.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

from firetitan.torch_threads import serial, threads_for

THREADS_ENV = "FIRETITAN_SNAPSHOT_THREADS"
_MAX_THREADS = 4

K = TypeVar("K")
R = TypeVar("R")

_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_pool_lock = threading.Lock()
_local = threading.local()


NICE_ENV = "FIRETITAN_SNAPSHOT_WRITER_NICE"
_NICE = 10


def background_thread() -> None:
    """Make the calling thread a background one: a lower CPU priority (Linux: per-thread nice,
    $FIRETITAN_SNAPSHOT_WRITER_NICE, default 10) and its per-tensor work run in it alone, so it yields
    to the train step and to hot-loads yet still finishes (nice 19 starved it past a train step here)."""
    _local.serial = True
    raw = os.environ.get(NICE_ENV, str(_NICE))
    with contextlib.suppress(AttributeError, OSError, ValueError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), int(raw))


def threads() -> int:
    raw = os.environ.get(THREADS_ENV)
    if raw is not None and raw.isdigit() and int(raw) > 0:
        return int(raw)
    cpus = os.cpu_count() or 1
    return 1 if cpus < 4 else min(_MAX_THREADS, cpus // 2)


def _executor(n: int) -> ThreadPoolExecutor:
    global _pool, _pool_size
    with _pool_lock:
        if _pool is None or _pool_size != n:  # one pool per process, replaced only when the setting changes
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool, _pool_size = ThreadPoolExecutor(n, thread_name_prefix="snapshot-tensor",
                                                   initializer=serial), n
        return _pool


def per_tensor(fn: Callable[[K, torch.Tensor], R], tensors: Mapping[K, torch.Tensor]) -> dict[K, R]:
    """`{key: fn(key, tensor)}` in the mapping's order, computed on the pool (in this thread when 1)."""
    n = 1 if getattr(_local, "serial", False) else threads()
    if n == 1 or len(tensors) < 2:
        return {k: fn(k, t) for k, t in tensors.items()}
    order = sorted(tensors, key=lambda k: -tensors[k].numel() * tensors[k].element_size())
    futures = {k: _executor(n).submit(fn, k, tensors[k]) for k in order}
    return {k: futures[k].result() for k in tensors}


def one_torch_thread() -> contextlib.AbstractContextManager[None]:
    """Run torch's copies and casts on one thread for the duration.

    A plain copy is memory-bound: a second thread gains little on an idle machine and, on a loaded one,
    its OpenMP team waits on busy cores (134 M bf16 values: 0.30 s on one thread, 0.8-3.0 s on two with
    the load at 5 on 2 cores). It applies to the calling thread (`torch_threads.threads_for`) and is
    restored on exit.
    """
    return threads_for(1)
