"""A trainer worker's shared-memory segments: gone after a graceful stop, swept after a SIGKILL; files written either way on stop."""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

import pytest
from trainer_procs import NANO, start_trainer

from firetitan.checkpoints import SnapshotStore, pending, shm
from firetitan.client.training import TrainingClient
from firetitan.errors import NotFoundError

pytestmark = pytest.mark.slow


def mine(directory: Path, pid: int) -> list[shm.SegmentName]:
    return [s for s in shm.live_segments(directory) if s.pid == pid]


def test_segments_go_on_stop_and_after_a_kill(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "shm"
    root.mkdir()
    monkeypatch.setenv(shm.SHM_ROOT_ENV, str(root))  # inherited by the workers
    monkeypatch.delenv(shm.SHM_ENV, raising=False)
    for how in ("stop", "kill"):
        trainer = start_trainer(tmp_path / how)
        directory = shm.segment_dir(trainer.store_dir)
        assert directory is not None
        shm.register_reader(directory)  # this test process plays a same-host replica of that store
        tc = TrainingClient.create(trainer.url, NANO)
        try:
            saved = [tc.save_weights_for_sampler(f"{how}-{i}").result() for i in range(3)]
        finally:
            tc.close()
        assert all(s.size_bytes is None for s in saved)  # published in shared memory
        assert len(mine(directory, trainer.process.pid)) == shm.MAX_LIVE_SEGMENTS  # the bound
        if how == "stop":
            trainer.process.stop(timeout=60)
            assert mine(directory, trainer.process.pid) == []
            # The background writes finished before the worker exited: every snapshot is on disk.
            store = SnapshotStore(trainer.store_dir)
            assert [store.manifest(s.path, wait=False).kind for s in saved] == ["base", "delta", "delta"]
        else:
            os.kill(trainer.process.pid, signal.SIGKILL)
            trainer.process.stop(timeout=30)  # reaps it
            assert len(mine(directory, trainer.process.pid)) == shm.MAX_LIVE_SEGMENTS  # nothing ran at exit
            assert shm.find(directory, saved[-1].path) is None  # the next lookup sweeps a dead writer's
            assert mine(directory, trainer.process.pid) == []
            # A snapshot whose background write died with it is not waited for: its marker is orphaned.
            store = SnapshotStore(trainer.store_dir)
            for s in saved:
                with contextlib.suppress(NotFoundError):
                    store.manifest(s.path)
                assert pending.read(store.snapshots_dir, s.path) is None
