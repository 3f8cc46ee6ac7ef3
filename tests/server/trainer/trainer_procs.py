"""Start trainer worker processes for tests (imported by conftest and the test modules)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from firetitan.server.process import WorkerProcess, spawn_worker

NANO = "firetitan/nano-qwen3"


@dataclass
class Trainer:
    url: str
    store_dir: Path
    state_dir: Path
    process: WorkerProcess


def start_trainer(root: Path, *extra: str, state_dir: Path | None = None) -> Trainer:
    store_dir, state = root / "store", state_dir or root / "state"
    proc = spawn_worker("firetitan.server.trainer",
                        ["--store-dir", str(store_dir), "--state-dir", str(state), *extra],
                        threads=1, log_path=root / "trainer.log", ready_timeout=180)
    return Trainer(proc.url, store_dir, state, proc)
