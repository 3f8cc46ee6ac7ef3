"""The engine's native kernels: how they are built and loaded, and the float32 matmul over row-blocked
weights.

A kernel `kernels/<name>.c` is compiled on first use with the machine's C compiler (`-O3 -march=native
-fopenmp`, ~0.2 s) into a cache directory and loaded with ctypes (`load_kernel`); nothing is compiled at
install time and torch's headers are not needed. The file name carries a hash of the source, the flags,
the compiler and the CPU's feature flags, so a cache shared between machines never loads code built for
another CPU. Without a compiler, or where the build or a kernel's probe against torch fails, its loader
returns None and the decode step keeps its torch ops (one log line says why).

Bounded: one file per (source, compiler, CPU) in the cache directory, written atomically.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple, TypeVar

import platformdirs
import torch
import torch.nn.functional as F

from firetitan.logging import get_logger

log = get_logger("firetitan.deployment.native")

KERNEL_DIR_ENV = "FIRETITAN_KERNEL_DIR"
BLOCK = 16  # output rows per block: one 16-float vector
_SOURCES = Path(__file__).with_name("kernels")
_FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")
_COMPILE_TIMEOUT_S = 120.0

K = TypeVar("K")


class RowBlocked(NamedTuple):
    """A weight [n, k] stored as [ceil(n / 16), k, 16] (zero rows pad the last block)."""

    blocks: torch.Tensor
    out_features: int


def row_block(weight: torch.Tensor) -> RowBlocked:
    """`weight` [n, k] (float32) in the kernel's layout: a copy, contiguous and 64-byte aligned."""
    n, k = weight.shape
    pad = -n % BLOCK
    padded = F.pad(weight.detach(), (0, 0, 0, pad)) if pad else weight.detach()
    return RowBlocked(padded.reshape(-1, BLOCK, k).transpose(1, 2).contiguous(), n)


class RowBlockedKernel:
    """`matmul(x, w)` = `x @ w.T` for a float32 `x` of any number of rows, `w` from `row_block`."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self._fn = library.ft_row_blocked_matmul
        self._fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long, ctypes.c_long,
                             ctypes.c_long, ctypes.c_int]
        self._fn.restype = ctypes.c_int

    def matmul(self, x: torch.Tensor, weight: RowBlocked) -> torch.Tensor:
        blocks = weight.blocks
        k = blocks.shape[1]
        if x.dtype != torch.float32 or x.shape[-1] != k:
            raise ValueError(f"row-blocked matmul takes float32 [..., {k}], got {x.dtype} {tuple(x.shape)}")
        rows = x.numel() // k
        if rows < 1:
            raise ValueError("row-blocked matmul takes at least one row, got none")
        flat = x.reshape(rows, k).contiguous()
        out = torch.empty(rows, blocks.shape[0] * BLOCK, dtype=torch.float32)
        # ctypes drops the GIL for the call; torch's threads run the blocks (see the C file).
        self._fn(blocks.data_ptr(), flat.data_ptr(), out.data_ptr(), blocks.shape[0], k, rows,
                 torch.get_num_threads())
        if weight.out_features != out.shape[1]:
            out = out[:, :weight.out_features]
        return out.reshape(*x.shape[:-1], weight.out_features)


def _cache_dir() -> Path:
    raw = os.environ.get(KERNEL_DIR_ENV) or Path(platformdirs.user_cache_dir("firetitan")) / "kernels"
    return Path(raw).expanduser()


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _build(compiler: str, source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        built = Path(scratch) / target.name
        subprocess.run([compiler, *_FLAGS, str(source), "-o", str(built)], check=True, capture_output=True,
                       timeout=_COMPILE_TIMEOUT_S)
        os.replace(built, target)  # atomic: a worker starting beside us sees the whole file or none


@functools.cache
def load_kernel(name: str) -> ctypes.CDLL | None:
    """`kernels/<name>.c` compiled for this machine, built once per cache directory; None where it
    cannot be (logged with the reason)."""
    if platform.system() != "Linux":  # the build uses gcc's flags and the ELF loader
        log.info("native_kernel_unavailable", kernel=name, reason=f"not built on {platform.system()}")
        return None
    compiler = shutil.which(os.environ.get("CC", "gcc"))
    if compiler is None:
        log.info("native_kernel_unavailable", kernel=name, reason="no C compiler (gcc) on PATH")
        return None
    source = _SOURCES / f"{name}.c"
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
        key = hashlib.sha256("\0".join([source.read_text(), " ".join(_FLAGS), version, _cpu_flags(),
                                        platform.machine()]).encode()).hexdigest()[:16]
        target = _cache_dir() / f"{name}-{key}.so"
        if not target.exists():
            _build(compiler, source, target)
            log.info("native_kernel_built", path=str(target))
        return ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", None)
        reason = (detail.decode(errors="replace") if isinstance(detail, bytes) else str(exc))[-500:]
        log.info("native_kernel_unavailable", kernel=name, reason=reason)
        return None


def _probe(kernel: RowBlockedKernel) -> bool:
    """The kernel's product equals torch's for every tile shape: 1 to 19 rows (whole and partial tiles of 8)
    times weights of 3, 5 and 7 blocks (column groups of 3 with none, 2 and 1 left over), odd widths
    and padded rows included."""
    gen = torch.Generator().manual_seed(0)
    for out_features in (37, 70, 100):
        weight = torch.randn(out_features, 29, generator=gen)
        blocked = row_block(weight)
        for rows in range(1, 20):
            x = torch.randn(rows, 29, generator=gen)
            if not torch.allclose(kernel.matmul(x, blocked), x @ weight.T, atol=1e-4, rtol=1e-4):
                return False
    return True


def checked_kernel(name: str, wrap: Callable[[ctypes.CDLL], K], probe: Callable[[K], bool]) -> K | None:
    """`load_kernel(name)` wrapped by `wrap`, if `probe` finds it agrees with torch on this machine; else None
    (logged): the decode step then keeps its torch ops."""
    library = load_kernel(name)
    if library is None:
        return None
    kernel = wrap(library)
    if not probe(kernel):
        log.warning("native_kernel_unavailable", kernel=name, reason="its results differ from torch's on this machine")
        return None
    return kernel


@functools.cache
def row_blocked_kernel() -> RowBlockedKernel | None:
    """The compiled row-blocked matmul for this machine; None where it cannot be built or miscomputes."""
    return checked_kernel("row_blocked", RowBlockedKernel, _probe)
