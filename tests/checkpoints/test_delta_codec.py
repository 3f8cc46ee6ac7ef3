"""The pure XOR delta codec: bit-exact round trips for every dtype and special value, and compactness."""

from __future__ import annotations

import pytest
import torch

from firetitan.checkpoints import delta as dz
from firetitan.errors import SnapshotError


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    # torch.equal treats NaN != NaN; compare raw bytes so NaN payloads and -0.0 count too.
    return a.dtype == b.dtype and a.shape == b.shape and bool((dz.tensor_bytes(a) == dz.tensor_bytes(b)).all())


def _special(dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor([0.0, -0.0, 1.0, -2.5, float("inf"), float("-inf"), float("nan"), 1e-30], dtype=dtype)


CASES = [
    (torch.float32, (17, 5)),
    (torch.bfloat16, (8, 3)),
    (torch.float16, (33,)),
    (torch.float64, (4, 4)),
    (torch.int64, (6,)),
    (torch.uint8, (10,)),
]


@pytest.mark.parametrize("codec", dz.CODECS)
@pytest.mark.parametrize(("dtype", "shape"), CASES)
def test_xor_round_trip_is_bit_exact(dtype: torch.dtype, shape: tuple[int, ...], codec: str) -> None:
    gen = torch.Generator().manual_seed(0)
    if dtype.is_floating_point:
        base = torch.randn(shape, generator=gen).to(dtype)
        new = (base.float() + 1e-3 * torch.randn(shape, generator=gen)).to(dtype)
    else:
        base = torch.randint(0, 100, shape, generator=gen).to(dtype)
        new = base.clone()
        new.view(-1)[0] += 1
    blob = dz.encode_xor(new, base, codec)
    assert blob is not None
    assert _bits_equal(dz.decode_xor(blob, base, codec), new)
    assert _bits_equal(dz.decode_raw(dz.encode_raw(new, codec), dtype, list(shape), codec), new)


@pytest.mark.parametrize(
    ("dtype", "int_dtype", "nan_bits"),
    [(torch.float32, torch.int32, 0x7FC00001), (torch.bfloat16, torch.int16, 0x7FC1), (torch.float16, torch.int16, 0x7E01)],
)
def test_special_values_and_nan_payloads_survive(dtype: torch.dtype, int_dtype: torch.dtype, nan_bits: int) -> None:
    base = _special(dtype)
    new = base.flip(0).contiguous()
    new.view(int_dtype)[0] = nan_bits  # a NaN with a non-default payload: the XOR must carry its exact bits
    assert torch.isnan(new[0])
    assert _bits_equal(dz.decode_xor(dz.encode_xor(new, base), base), new)


def test_scalar_empty_and_unchanged() -> None:
    scalar, other = torch.tensor(3.0), torch.tensor(-3.0)
    assert _bits_equal(dz.decode_xor(dz.encode_xor(other, scalar), scalar), other)
    empty = torch.empty(0, 4)
    assert dz.encode_xor(empty, empty.clone()) is None
    same = torch.randn(5, 5)
    assert dz.encode_xor(same.clone(), same) is None
    assert _bits_equal(dz.decode_xor(None, same), same)


def test_small_update_compresses_well() -> None:
    gen = torch.Generator().manual_seed(0)
    base = 0.02 * torch.randn(256, 256, generator=gen)
    new = base - 1e-5 * torch.sign(torch.randn(256, 256, generator=gen))  # an Adam-sized step
    blob = dz.encode_xor(new, base)
    raw = base.numel() * base.element_size()
    assert blob is not None and len(blob) < 0.6 * raw
    # The shuffle is what makes it compact: the unshuffled XOR compresses worse.
    unshuffled = dz.compress(dz.tensor_bytes(new) ^ dz.tensor_bytes(base), dz.DEFAULT_CODEC)
    assert len(blob) < len(unshuffled)


def test_corrupt_blob_raises_snapshot_error() -> None:
    base = torch.randn(64)
    blob = bytearray(dz.encode_xor(base + 1, base) or b"")
    with pytest.raises(SnapshotError):
        dz.decode_xor(bytes(blob[: len(blob) // 2]), base)
    with pytest.raises(SnapshotError):
        dz.decompress(b"not compressed", "zlib", 256)
    with pytest.raises(SnapshotError):
        dz.compress(b"x", "lz4")
