"""Same-host weight sync in process: a TrainerEngine publishing through shared memory and a replica's SnapshotLoader."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch
from shm_helpers import flip_one_bit

from firetitan.checkpoints import SnapshotStore, shm
from firetitan.errors import SnapshotError
from firetitan.models import load_model
from firetitan.server.deployment.hotload import HotLoadState, SnapshotLoader
from firetitan.server.trainer.batch import prepare_batch
from firetitan.server.trainer.engine import ModelSpec, TrainerEngine
from firetitan.types import AdamParams, Datum, ModelInput, TensorData

NANO = "firetitan/nano-qwen3"


@pytest.fixture(autouse=True)
def shm_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    torch.set_num_threads(1)
    root = tmp_path / "shm"
    root.mkdir()
    monkeypatch.setenv(shm.SHM_ROOT_ENV, str(root))
    monkeypatch.delenv(shm.SHM_ENV, raising=False)
    return root


def train_step(engine: TrainerEngine, gen: torch.Generator) -> None:
    ids = torch.randint(3, engine.vocab_size, (2, 9), generator=gen)
    data = [Datum(model_input=ModelInput.from_ints(r[:-1].tolist()),
                  loss_fn_inputs={"target_tokens": TensorData.from_torch(r[1:])}) for r in ids]
    engine.forward(prepare_batch(data, "cross_entropy", None, engine.vocab_size, engine.pad_id), backward=True)
    engine.optim_step(AdamParams(learning_rate=1e-3))


class Replica:
    """A deployment's loader and served model, updated as ReplicaHotLoader does after a swap."""

    def __init__(self, store: SnapshotStore, dtype: str) -> None:
        self.model = load_model(NANO, dtype=dtype)
        self.loader = SnapshotLoader(store, dict(self.model.state_dict()), startup={})
        self.state = HotLoadState(base_model=NANO)

    def load(self, identity: str) -> str | None:
        self.loader.check_chain(identity, None, self.state)
        prepared = self.loader.prepare(identity, self.state)
        with torch.no_grad():
            self.model.load_state_dict(prepared.state_dict, strict=False)
        if prepared.kind == "base":
            self.state.base_identity = prepared.identity
            self.state.base_state_dict = None if prepared.segment is not None else prepared.state_dict
        self.state.current_identity = identity
        return None if prepared.segment is None else prepared.segment.file

    def equals(self, engine: TrainerEngine) -> bool:
        served = self.model.state_dict()
        return all(torch.equal(served[k], v.detach().to(self.model.dtype)) for k, v in engine.model.state_dict().items())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_shm_base_and_deltas_serve_the_trainer_weights_and_the_background_files_match_a_sync_save(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dtype: str) -> None:
    store = SnapshotStore(tmp_path / "store")
    replica = Replica(store, dtype)  # registers as a same-host reader of this store
    engine = TrainerEngine("e", ModelSpec(NANO, dtype=dtype), store=store, states=None)
    gen = torch.Generator().manual_seed(0)
    outs = []
    for step in range(4):
        train_step(engine, gen)
        # A base in the middle: the writes queued behind each other must each use their own base.
        out = engine.save_for_sampler(f"s{step}", None, "base" if step == 2 else None)
        assert out["size_bytes"] is None  # returned before the files were written
        assert replica.load(out["path"]) is not None  # loaded from a segment
        assert replica.equals(engine), f"step {step}"
        outs.append(out)
    assert [o["checkpoint_type"] for o in outs] == ["base", "delta", "base", "delta"]
    assert [o["previous_snapshot_identity"] for o in outs] == [None, "s0", None, "s2"]
    assert len(shm.live_segments(engine.snapshots.publisher.directory)) <= shm.MAX_LIVE_SEGMENTS

    # The same job with shared memory off writes every snapshot synchronously: same bytes on disk.
    monkeypatch.setenv(shm.SHM_ENV, "0")
    sync_store = SnapshotStore(tmp_path / "sync-store")
    sync = TrainerEngine("e", ModelSpec(NANO, dtype=dtype), store=sync_store, states=None)
    gen = torch.Generator().manual_seed(0)
    for step in range(4):
        train_step(sync, gen)
        assert sync.save_for_sampler(f"s{step}", None, "base" if step == 2 else None)["size_bytes"] > 0
    engine.close()
    assert shm.live_segments(engine.snapshots.publisher.directory) == []
    for step in range(4):
        bg, fg = store.manifest(f"s{step}"), sync_store.manifest(f"s{step}")
        assert (bg.kind, bg.previous_snapshot_identity, bg.tensor_sha256) == \
            (fg.kind, fg.previous_snapshot_identity, fg.tensor_sha256)
        store.verify(f"s{step}")
    # A fresh replica (a restart, or another host) resumes from the files alone: base, then the last delta.
    fresh = Replica(store, dtype)
    assert fresh.load("s0") is None and fresh.load("s1") is None
    assert fresh.load("s2") is None and fresh.load("s3") is None
    assert fresh.equals(engine)


def test_a_damaged_segment_is_refused_and_the_replica_keeps_its_weights(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path / "store")
    replica = Replica(store, "float32")
    engine = TrainerEngine("e", ModelSpec(NANO), store=store, states=None)
    gen = torch.Generator().manual_seed(1)
    train_step(engine, gen)
    replica.load(engine.save_for_sampler("base", None, None)["path"])
    before = {k: v.clone() for k, v in replica.model.state_dict().items()}
    train_step(engine, gen)
    identity = engine.save_for_sampler("next", None, None)["path"]
    path = shm.find(replica.loader.shm_dir, identity)
    assert path is not None
    flip_one_bit(path, 0x01)
    with pytest.raises(SnapshotError, match="CRC-32"):
        replica.load(identity)
    assert all(torch.equal(replica.model.state_dict()[k], v) for k, v in before.items())
    assert replica.state.current_identity == "base"
    engine.close()


def test_a_failed_background_write_fails_the_next_save_and_the_chain_restarts(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path / "store")
    Replica(store, "float32")
    engine = TrainerEngine("e", ModelSpec(NANO), store=store, states=None)
    assert engine.save_for_sampler("b0", None, None)["checkpoint_type"] == "base"
    engine.snapshots.flush()
    store.delete("b0")  # the delta written next in the background has no base on disk
    assert engine.save_for_sampler("d1", None, None)["checkpoint_type"] == "delta"
    deadline = time.monotonic() + 60
    while not engine.snapshots.writes_done() and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(SnapshotError, match="'d1' failed to write in the background"):
        engine.save_for_sampler("d2", None, None)
    assert "d1" in engine.snapshots.status()["snapshot_error"]
    assert not store.exists("d1") and not store.exists("d2")
    assert engine.save_for_sampler("b3", None, None)["checkpoint_type"] == "base"
    engine.close()
    assert store.exists("b3")


def test_without_a_same_host_reader_or_with_shm_off_the_save_writes_files(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = SnapshotStore(tmp_path / "store")
    engine = TrainerEngine("e", ModelSpec(NANO), store=store, states=None)
    out = engine.save_for_sampler("alone", None, None)  # no replica of this store on this host
    assert out["size_bytes"] > 0 and store.exists("alone")
    monkeypatch.setenv(shm.SHM_ENV, "0")
    replica = Replica(store, "float32")
    assert replica.loader.shm_dir is None
    off = TrainerEngine("e2", ModelSpec(NANO), store=store, states=None)
    assert off.snapshots.publisher is None
    out = off.save_for_sampler("off", None, None)
    assert out["size_bytes"] > 0 and replica.load("off") is None and replica.equals(off)
    engine.close()
    off.close()


def test_a_file_delta_after_a_shm_base_reads_that_base_from_the_store(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path / "store")
    replica = Replica(store, "bfloat16")
    engine = TrainerEngine("e", ModelSpec(NANO, dtype="bfloat16"), store=store, states=None)
    gen = torch.Generator().manual_seed(2)
    train_step(engine, gen)
    assert replica.load(engine.save_for_sampler("b", None, None)["path"]) is not None  # from the segment
    assert replica.state.base_state_dict is None  # not kept: the mapping is gone after the swap
    (replica.loader.shm_dir / f"reader.{os.getpid()}").unlink()  # the trainer now sees no same-host replica
    train_step(engine, gen)
    out = engine.save_for_sampler("d", None, None)
    assert out["checkpoint_type"] == "delta" and out["size_bytes"] > 0  # written as files, before returning
    assert replica.load(out["path"]) is None  # the delta from its file, the base read from the store
    assert replica.equals(engine)
    engine.close()
