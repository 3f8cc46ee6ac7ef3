"""Fixtures for end-to-end runs: a private FIRETITAN_HOME whose daemon is killed afterwards."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from home_helpers import Home


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Home]:
    h = Home(tmp_path / "ft-home")
    for key, value in h.env.items():
        if key.startswith(("FIRETITAN_", "HF_", "TOKENIZERS_")):
            monkeypatch.setenv(key, value)
    try:
        yield h
    finally:
        h.stop_everything()

