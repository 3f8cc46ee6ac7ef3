"""`keep_freed_memory`: a freed large block stays with the process for reuse instead of going back to the OS."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# In a child process: the malloc settings are process-wide and must not leak into this test process.
SCRIPT = r"""
import ctypes, json, sys
from firetitan.heap import keep_freed_memory

applied = keep_freed_memory() if sys.argv[1] == "keep" else None
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]

def resident() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096

size = 16 << 20
block = libc.malloc(size)
ctypes.memset(block, 1, size)  # touch every page
before = resident()
libc.free(block)
print(json.dumps({"applied": applied, "released": before - resident()}))
"""


def _run(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=60, check=True)
    return json.loads(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc and /proc are Linux's")
def test_a_freed_16_mb_block_is_kept_only_when_asked() -> None:
    default, kept = _run("default"), _run("keep")
    assert default["released"] >= 15 << 20  # glibc's default: mapped on malloc, unmapped on free
    assert kept["applied"] is True
    assert kept["released"] < 1 << 20  # kept in the heap for the next allocation
