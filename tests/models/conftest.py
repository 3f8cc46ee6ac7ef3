"""Shared fixtures for the model tests: one CPU thread, and one exported nano model per session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from firetitan.models import export_model


@pytest.fixture(autouse=True, scope="session")
def _one_thread() -> Iterator[None]:
    # 2 shared cores for many engineers; one thread also keeps float results independent of scheduling.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def nano_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_model("firetitan/nano-qwen3", tmp_path_factory.mktemp("models") / "nano-qwen3")
