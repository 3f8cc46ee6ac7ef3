"""Shared-memory segments: cast-copy round trip, refusal of damaged segments, the live bound, cleanup after close and kill."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from firetitan.checkpoints import shm
from firetitan.errors import SnapshotError


@pytest.fixture
def seg_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(shm.SHM_ROOT_ENV, str(tmp_path / "shm"))
    (tmp_path / "shm").mkdir()
    directory = shm.segment_dir(tmp_path / "store")
    assert directory is not None and directory.parent == tmp_path / "shm"
    return directory


def weights(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    emb = torch.randn(50, 8, generator=gen)
    return {"embed.weight": emb, "lm_head.weight": emb, "norm.weight": torch.randn(8, generator=gen),
            "empty": torch.zeros(0), "steps": torch.tensor([3, 4], dtype=torch.int64)}


def publish(pub: shm.ShmPublisher, identity: str, sd: dict[str, torch.Tensor], dtype: torch.dtype) -> Path:
    canonical = {k: v for k, v in sd.items() if k != "lm_head.weight"}
    name, _mm, _header = pub.publish(identity, canonical, dtype, kind="base", previous=None,
                                     aliases={"lm_head.weight": "embed.weight"})
    return pub.directory / name.file


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_segment_round_trips_bit_for_bit_in_the_serving_dtype(seg_dir: Path, dtype: torch.dtype) -> None:
    pub = shm.ShmPublisher(seg_dir)
    sd = weights()
    path = publish(pub, "snap-a", sd, dtype)
    assert shm.find(seg_dir, "snap-a") == path
    seg = shm.open_segment(path)
    assert seg.header["kind"] == "base" and seg.name.identity == "snap-a"
    for key, t in sd.items():
        want = t.to(dtype) if t.is_floating_point() else t
        got = seg.tensors[key]
        assert got.dtype == want.dtype and torch.equal(got.view(-1).view(torch.uint8) if got.numel() else got,
                                                        want.reshape(-1).view(torch.uint8) if want.numel() else want)
    assert seg.tensors["lm_head.weight"] is seg.tensors["embed.weight"]  # tied alias restored, stored once
    # Copy-on-write mapping: writing a handed-out tensor leaves the segment as published.
    seg.tensors["norm.weight"].zero_()
    assert torch.equal(shm.open_segment(path).tensors["norm.weight"], sd["norm.weight"].to(dtype))
    pub.close()


def test_damaged_segments_are_refused_naming_what_is_wrong(seg_dir: Path) -> None:
    pub = shm.ShmPublisher(seg_dir)
    path = publish(pub, "snap-b", weights(), torch.float32)
    seg = shm.open_segment(path)
    offset = seg.header["data_offset"] + next(e for e in seg.header["tensors"] if e["name"] == "norm.weight")["offset"]
    del seg
    raw = bytearray(path.read_bytes())
    raw[offset + 5] ^= 0x10
    path.write_bytes(raw)
    with pytest.raises(SnapshotError, match=r"corrupt: tensor 'norm\.weight' does not match its CRC-32"):
        shm.open_segment(path)
    path.write_bytes(bytes(raw[: len(raw) - 100]))
    with pytest.raises(SnapshotError, match="is truncated"):
        shm.open_segment(path)
    path.write_bytes(b"NOTMAGIC" + bytes(raw[8:]))
    with pytest.raises(SnapshotError, match="magic"):
        shm.open_segment(path)
    pub.close()


def test_a_writer_keeps_at_most_two_segments_and_close_removes_them(seg_dir: Path) -> None:
    pub = shm.ShmPublisher(seg_dir)
    for i in range(4):
        publish(pub, f"snap-{i}", weights(i), torch.bfloat16)
        assert len(shm.live_segments(seg_dir)) == min(i + 1, shm.MAX_LIVE_SEGMENTS)
    assert [s.identity for s in shm.live_segments(seg_dir)] == ["snap-2", "snap-3"]
    # A replica that serves generation 4 acks it: the older one goes.
    shm.ack(seg_dir, shm.live_segments(seg_dir)[-1])
    assert [s.identity for s in shm.live_segments(seg_dir)] == ["snap-3"]
    pub.close()
    assert shm.live_segments(seg_dir) == [] and not seg_dir.exists()


def test_segments_and_reader_marks_of_a_killed_process_are_swept(seg_dir: Path, tmp_path: Path) -> None:
    script = textwrap.dedent(f"""
        import os, signal, torch
        from pathlib import Path
        from firetitan.checkpoints import shm
        d = Path({str(seg_dir)!r})
        shm.register_reader(d)
        pub = shm.ShmPublisher(d)
        pub.publish("snap-k", {{"w": torch.ones(1000)}}, torch.float32, kind="base", previous=None, aliases={{}})
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", script], env={**os.environ}, timeout=120, check=False)
    assert proc.returncode == -signal.SIGKILL
    left = [s for s in shm.live_segments(seg_dir) if s.identity == "snap-k"]
    assert len(left) == 1  # killed: nothing of its own ran at exit
    assert not shm.has_live_reader(seg_dir)  # the dead replica does not count, and its mark goes
    assert shm.find(seg_dir, "snap-k") is None  # any lookup sweeps dead writers
    assert sorted(p.name for p in seg_dir.iterdir()) == []
