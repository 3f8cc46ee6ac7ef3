"""Lossless delta encoding of one tensor against a base: XOR of raw bits, byte-plane shuffle, compress.

XOR of the bit patterns is exact for every dtype (NaN payloads and -0.0 included). A small optimizer
step leaves sign, exponent and the high mantissa bits of most weights unchanged, so after the XOR
those bytes are zero; grouping the k-th byte of every element together (the "shuffle") turns them into
long zero runs that a general-purpose compressor squeezes to almost nothing.
"""

from __future__ import annotations

import hashlib
import math
import zlib

import numpy as np
import torch

from firetitan.errors import SnapshotError

try:  # zstd is faster and tighter than zlib; zlib (stdlib) keeps the store usable without it.
    import zstandard
except ImportError:  # pragma: no cover - exercised only where zstandard is absent
    zstandard = None

DEFAULT_CODEC = "zstd" if zstandard is not None else "zlib"
CODECS = ("zstd", "zlib")
# Level 1: on byte-shuffled XOR planes level 3 saved 0.1 % of the size for 1.1-1.8x the encode time
# (nano/tiny-qwen3 deltas), and the encode sits on the trainer's path to every weight sync.
_ZSTD_LEVEL = 1
_ZLIB_LEVEL = 6


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise SnapshotError(f"unknown tensor dtype {name!r} in snapshot")
    return dtype


def tensor_bytes(t: torch.Tensor) -> np.ndarray:
    """The tensor's raw little-endian bytes as a flat uint8 array (no copy when already CPU-contiguous)."""
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy()


def tensor_sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(tensor_bytes(t)).hexdigest()


def tensor_from_bytes(buf: np.ndarray, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    arr = np.ascontiguousarray(buf, dtype=np.uint8)
    if not arr.flags.writeable:
        arr = arr.copy()
    return torch.from_numpy(arr).view(dtype).reshape(shape)


def compress(data: bytes | memoryview | np.ndarray, codec: str) -> bytes:
    if codec == "zstd":
        if zstandard is None:
            raise SnapshotError("codec 'zstd' needs the 'zstandard' package")
        return zstandard.ZstdCompressor(level=_ZSTD_LEVEL).compress(data)
    if codec == "zlib":
        return zlib.compress(data, _ZLIB_LEVEL)
    raise SnapshotError(f"unknown delta codec {codec!r}; valid: {', '.join(CODECS)}")


def decompress(blob: bytes | memoryview, codec: str, expected_size: int) -> bytes:
    try:
        if codec == "zstd":
            if zstandard is None:
                raise SnapshotError("this delta uses codec 'zstd'; install the 'zstandard' package")
            out = zstandard.ZstdDecompressor().decompress(blob, max_output_size=expected_size)
        elif codec == "zlib":
            out = zlib.decompress(blob)
        else:
            raise SnapshotError(f"unknown delta codec {codec!r}; valid: {', '.join(CODECS)}")
    except (zlib.error, ValueError) as exc:
        raise SnapshotError(f"delta payload does not decompress ({codec}): {exc}") from exc
    except Exception as exc:
        if zstandard is not None and isinstance(exc, zstandard.ZstdError):
            raise SnapshotError(f"delta payload does not decompress ({codec}): {exc}") from exc
        raise
    if len(out) != expected_size:
        raise SnapshotError(f"delta payload decompressed to {len(out)} bytes, expected {expected_size}")
    return out


def _shuffle(xor: np.ndarray, itemsize: int) -> np.ndarray:
    return np.ascontiguousarray(xor.reshape(-1, itemsize).T) if itemsize > 1 else xor


def _unshuffle(planes: np.ndarray, itemsize: int) -> np.ndarray:
    if itemsize == 1:
        return planes
    # One strided column write per byte plane: 5x faster than a transposed copy of the whole
    # [itemsize, n] array (1.1 vs 5.8 ms for 623k float32 values), and this runs in every hot-load.
    out = np.empty((planes.size // itemsize, itemsize), dtype=np.uint8)
    for j, plane in enumerate(planes.reshape(itemsize, -1)):
        out[:, j] = plane
    return out.reshape(-1)


def encode_xor(new: torch.Tensor, base: torch.Tensor, codec: str = DEFAULT_CODEC) -> bytes | None:
    """Compressed shuffled XOR of `new` against `base` (same dtype and shape); None when bit-identical."""
    if new.dtype != base.dtype or tuple(new.shape) != tuple(base.shape):
        raise ValueError("encode_xor needs tensors of the same dtype and shape")
    xor = np.bitwise_xor(tensor_bytes(new), tensor_bytes(base))
    if not xor.any():
        return None
    return compress(_shuffle(xor, new.element_size()), codec)


def decode_xor(blob: bytes | memoryview | None, base: torch.Tensor, codec: str = DEFAULT_CODEC) -> torch.Tensor:
    """Invert `encode_xor`: the new tensor, bit for bit, from its delta blob and the same base."""
    base_bytes = tensor_bytes(base)
    if blob is None:
        return tensor_from_bytes(base_bytes.copy(), base.dtype, list(base.shape))
    planes = np.frombuffer(decompress(blob, codec, base_bytes.size), dtype=np.uint8)
    xor = _unshuffle(planes, base.element_size())
    return tensor_from_bytes(np.bitwise_xor(xor, base_bytes), base.dtype, list(base.shape))


def encode_raw(t: torch.Tensor, codec: str = DEFAULT_CODEC) -> bytes:
    """A tensor with no counterpart in the base, compressed on its own (still lossless)."""
    return compress(_shuffle(tensor_bytes(t), t.element_size()), codec)


def decode_raw(blob: bytes | memoryview, dtype: torch.dtype, shape: list[int], codec: str) -> torch.Tensor:
    itemsize = torch.empty((), dtype=dtype).element_size()
    size = itemsize * math.prod(shape)
    planes = np.frombuffer(decompress(blob, codec, size), dtype=np.uint8)
    return tensor_from_bytes(_unshuffle(planes, itemsize), dtype, shape)
