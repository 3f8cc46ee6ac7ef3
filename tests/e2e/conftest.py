"""Fixtures for end-to-end runs: a private FIRETITAN_HOME whose daemon is killed afterwards."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from home_helpers import Home, private_home


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Home]:
    with private_home(Home(tmp_path / "ft-home"), monkeypatch) as h:
        yield h

