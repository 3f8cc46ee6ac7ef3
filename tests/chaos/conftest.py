"""Fixtures of the chaos suite: a temp FIRETITAN_HOME per test, and no process of it left afterwards."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from chaos_home import ChaosHome
from home_helpers import private_home


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ChaosHome]:
    h = ChaosHome(tmp_path / "ft-home")
    with private_home(h, monkeypatch):
        yield h
    # The suite's own contract: whatever a test did, it leaves no process of its home behind.
    assert h.control_plane_pids() == [] and h.worker_pids() == []
