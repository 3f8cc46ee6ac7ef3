"""The per-tensor thread pool changes nothing in a delta: same payload bytes, same applied weights, same refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from firetitan.checkpoints import SnapshotStore
from firetitan.checkpoints.parallel import THREADS_ENV
from firetitan.errors import SnapshotError


def test_a_delta_is_the_same_on_one_thread_and_on_the_pool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gen = torch.Generator().manual_seed(3)
    base = {f"w{i}": torch.randn(64 * (i + 1), 32, generator=gen).to(torch.bfloat16) for i in range(6)}
    base["same"] = torch.randn(8, generator=gen)
    new = {k: (v.float() + (0 if k == "same" else 1e-2) * torch.randn(v.shape, generator=gen)).to(v.dtype)
           for k, v in base.items()}
    out: dict[str, object] = {}
    for threads in ("1", "3"):
        monkeypatch.setenv(THREADS_ENV, threads)
        store = SnapshotStore(tmp_path / threads)
        b = store.save_base("b", base, {"model_type": "test"})
        d = store.save_delta("d", new, b.identity, base_state_dict=base)
        applied = store.load_state_dict(d.identity, base, base_identity=b.identity)
        assert all(torch.equal(applied[k], new[k]) for k in new)
        # Safetensors orders header metadata as it likes, so compare what the file holds, not its bytes.
        with safe_open(str(tmp_path / threads / "snapshots" / "d" / "delta.safetensors"), framework="pt") as f:
            blobs = {k: f.get_tensor(k) for k in f.keys()}
            out[threads] = (f.metadata(), store.manifest("d").tensor_sha256, sorted(blobs))
        out[threads + "-blobs"] = blobs
        wrong = {**base, "w5": base["w5"] + 1}  # a base that is not the one the delta was made against
        with pytest.raises(SnapshotError, match="differs at tensor 'w5'"):
            store.load_state_dict(d.identity, wrong, verify=True)
    assert out["1"] == out["3"]
    assert all(torch.equal(out["1-blobs"][k], out["3-blobs"][k]) for k in out["1-blobs"])
