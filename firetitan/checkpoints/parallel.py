"""Per-tensor snapshot work (XOR + shuffle + zstd, digests) spread over a small, bounded thread pool.

The work releases the GIL where it is heavy (numpy XOR and copies, zstd, hashlib), so threads run it
in parallel. Tensors are handed out largest first so one big embedding does not finish last alone.
$FIRETITAN_SNAPSHOT_THREADS sets the pool size (default: the CPU count, at most 4; 1 = no pool).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

THREADS_ENV = "FIRETITAN_SNAPSHOT_THREADS"
_MAX_THREADS = 4

K = TypeVar("K")
R = TypeVar("R")

_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_pool_lock = threading.Lock()


def threads() -> int:
    raw = os.environ.get(THREADS_ENV)
    if raw is not None and raw.isdigit() and int(raw) > 0:
        return int(raw)
    return max(1, min(_MAX_THREADS, os.cpu_count() or 1))


def _executor(n: int) -> ThreadPoolExecutor:
    global _pool, _pool_size
    with _pool_lock:
        if _pool is None or _pool_size != n:  # one pool per process, replaced only when the setting changes
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool, _pool_size = ThreadPoolExecutor(n, thread_name_prefix="snapshot-tensor"), n
        return _pool


def per_tensor(fn: Callable[[K, torch.Tensor], R], tensors: Mapping[K, torch.Tensor]) -> dict[K, R]:
    """`{key: fn(key, tensor)}` in the mapping's order, computed on the pool (in this thread when 1)."""
    n = threads()
    if n == 1 or len(tensors) < 2:
        return {k: fn(k, t) for k, t in tensors.items()}
    order = sorted(tensors, key=lambda k: -tensors[k].numel() * tensors[k].element_size())
    futures = {k: _executor(n).submit(fn, k, tensors[k]) for k in order}
    return {k: futures[k].result() for k in tensors}
