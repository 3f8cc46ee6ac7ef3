"""A delete while a worker is still loading ends that startup, instead of waiting until it is ready."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from firetitan.errors import WorkerCrashedError
from firetitan.server.control_plane.supervisor import Supervisor, WorkerKey

HERE = Path(__file__).resolve().parent


async def _nothing(*_: object) -> None:
    return None


async def test_abort_start_kills_a_loading_worker_and_start_fails_typed(tmp_path: Path) -> None:
    # ready_timeout 600 s: without the abort, start() would wait ten minutes (the hang it fixes).
    sup = Supervisor(logs_dir=tmp_path, api_key=None, on_exit=_nothing, ready_timeout=600,
                     worker_env={"PYTHONPATH": str(HERE)})
    key = WorkerKey("trainer", "local", "loading")
    assert not sup.abort_start(key)  # nothing starting: nothing to do
    task = asyncio.create_task(sup.start(key, "never_ready_worker", [], threads=1))
    for _ in range(400):
        if sup.abort_start(key):
            break
        await asyncio.sleep(0.05)
    else:
        pytest.fail("the worker never appeared as starting")
    with pytest.raises(WorkerCrashedError, match="exited with code -9 before listening"):
        await asyncio.wait_for(task, 60)
    assert sup.get(key) is None and not sup.abort_start(key)
