"""Fixtures shared across test directories."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from process_scan import live_pids


def _live_home_workers(home: Path) -> list[int]:
    """Trainer/deployment processes whose snapshot store is `home`'s, whoever their parent is."""
    return live_pids(lambda cmd: "firetitan.server." in cmd and f"{home}/store" in cmd)


@pytest.fixture
def home_workers() -> Callable[[Path], list[int]]:
    """`home_workers(home)`: pids of the live worker processes of a state directory."""
    return _live_home_workers
