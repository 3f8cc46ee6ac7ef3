"""Fixtures shared across test directories."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import psutil
import pytest


def _live_home_workers(home: Path) -> list[int]:
    """Trainer/deployment processes whose snapshot store is `home`'s, whoever their parent is."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        try:
            cmd = " ".join(proc.info["cmdline"] or [])
            if ("firetitan.server." in cmd and f"{home}/store" in cmd
                    and proc.info["status"] != psutil.STATUS_ZOMBIE):
                found.append(proc.pid)
        except psutil.Error:
            continue
    return found


@pytest.fixture
def home_workers() -> Callable[[Path], list[int]]:
    """`home_workers(home)`: pids of the live worker processes of a state directory."""
    return _live_home_workers
