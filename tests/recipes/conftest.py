"""A control plane for the recipe tests, owned by the test session (stopped at the end, workers with it)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from firetitan.server.control_plane.home import resolve_home
from firetitan.server.process import spawn_worker


@pytest.fixture(scope="session")
def ft_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    home = tmp_path_factory.mktemp("ft-home")
    layout = resolve_home(home).ensure()
    worker = spawn_worker("firetitan.server.control_plane", ["--home", str(home)],
                          log_path=layout.logs / "control_plane.log", ready_timeout=180)
    try:
        yield home
    finally:
        worker.stop(60)
