"""Fixtures for deployment-worker tests: one real nano-qwen3 worker process on loopback per session."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from firetitan.server.process import WorkerProcess, spawn_worker

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

NANO = "firetitan/nano-qwen3"


@pytest.fixture(scope="session")
def store_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("deployment-store")


@pytest.fixture(scope="session")
def worker(store_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    log_path = tmp_path_factory.mktemp("deployment-logs") / "worker.log"
    proc = spawn_worker("firetitan.server.deployment",
                        ["--base-model", NANO, "--store-dir", str(store_dir), "--deployment-id", "test-dep",
                         "--max-running-seqs", "8", "--max-cached-tokens", "8192"],
                        threads=1, log_path=log_path, ready_timeout=180)
    yield proc
    proc.stop(timeout=10)
    assert not proc.alive()
