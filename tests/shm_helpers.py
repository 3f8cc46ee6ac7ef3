"""Test helper for the shared-memory weight path: damage a published segment the way a torn write would."""

from __future__ import annotations

from pathlib import Path

from firetitan.checkpoints import shm


def flip_one_bit(path: Path, mask: int = 0x04) -> None:
    """Flip one bit inside the last tensor's bytes (not in the alignment padding after it)."""
    seg = shm.open_segment(path)
    last = seg.header["tensors"][-1]
    at = seg.header["data_offset"] + last["offset"] + last["nbytes"] - 1
    del seg
    with open(path, "r+b") as f:
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ mask]))
