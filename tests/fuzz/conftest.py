"""Fixtures of the fuzz suite: one real worker of each kind on loopback, started with a key."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from fuzz_http import KEY, Target

from firetitan.server.process import spawn_worker

os.environ.setdefault("HF_HUB_OFFLINE", "1")

NANO = "firetitan/nano-qwen3"


def _start(module: str, args: list[str], root: Path) -> Target:
    proc = spawn_worker(module, args, threads=1, log_path=root / "worker.log", ready_timeout=180,
                        env={"FIRETITAN_WORKER_API_KEY": KEY})
    return Target(proc.url, proc, KEY)


@pytest.fixture(scope="module")
def trainer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    root = tmp_path_factory.mktemp("fuzz-trainer")
    t = _start("firetitan.server.trainer", ["--store-dir", str(root / "store"), "--state-dir", str(root / "state")],
               root)
    yield t
    t.process.stop()


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    root = tmp_path_factory.mktemp("fuzz-deployment")
    t = _start("firetitan.server.deployment",
               ["--base-model", NANO, "--store-dir", str(root / "store"), "--deployment-id", "fuzz-dep",
                "--max-running-seqs", "4", "--max-cached-tokens", "4096"], root)
    yield t
    t.process.stop()


@pytest.fixture(scope="module")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    home = tmp_path_factory.mktemp("fuzz-cp") / "home"
    home.mkdir()
    (home / "api_key").write_text(KEY)
    proc = spawn_worker("firetitan.server.control_plane",
                        ["--home", str(home), "--trainer-threads", "1", "--replica-threads", "1"],
                        ready_timeout=60, log_path=home / "cp.log")
    t = Target(proc.url, proc, KEY)
    yield t
    proc.stop(timeout=20)
