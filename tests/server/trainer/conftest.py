"""A trainer worker process on loopback (nano model, one torch thread), shared by this folder's tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from trainer_procs import Trainer, start_trainer


@pytest.fixture(scope="module")
def trainer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Trainer]:
    t = start_trainer(tmp_path_factory.mktemp("trainer"))
    try:
        yield t
    finally:
        t.process.stop()
