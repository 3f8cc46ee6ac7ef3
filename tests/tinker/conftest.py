"""Fixtures: a real control plane on loopback with a `tml-` key, for the unmodified tinker SDK."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from firetitan.server.process import WorkerProcess, spawn_worker

API_KEY = "tml-firetitan-test-key"


@dataclass
class TinkerServer:
    home: Path
    worker: WorkerProcess

    @property
    def url(self) -> str:
        return self.worker.url

    def worker_pids(self) -> list[int]:
        """Trainer and deployment workers this control plane started (and that still run)."""
        try:
            children = psutil.Process(self.worker.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        out = []
        for proc in children:
            try:
                cmd = " ".join(proc.cmdline())
                if proc.status() != psutil.STATUS_ZOMBIE and (
                        "firetitan.server.trainer" in cmd or "firetitan.server.deployment" in cmd):
                    out.append(proc.pid)
            except psutil.Error:
                continue
        return out


@pytest.fixture(scope="module")
def tinker_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TinkerServer]:
    home = tmp_path_factory.mktemp("tinker") / "home"
    args = ["--home", str(home), "--trainer-threads", "1", "--replica-threads", "1", "--health-interval", "0.5",
            "--api-key", API_KEY]
    worker = spawn_worker("firetitan.server.control_plane", args, ready_timeout=60, log_path=home / "cp.log")
    try:
        yield TinkerServer(home, worker)
    finally:
        worker.stop(timeout=30)
