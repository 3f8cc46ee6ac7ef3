"""Batch-shaped weights: packed only for a settled batch size, at most `max_packs`, least recent dropped."""

import pytest
import torch

from firetitan.models import load_model
from firetitan.server.deployment.engine.batch_packs import BatchPacks
from firetitan.server.deployment.engine.ops import mkl_packing_works

pytestmark = pytest.mark.skipif(not mkl_packing_works(torch.float32, torch.device("cpu")),
                                reason="this torch build has no MKL packed GEMM")


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return load_model("firetitan/nano-qwen3")


def test_a_size_is_packed_after_settle_steps_in_a_row(model: torch.nn.Module) -> None:
    packs = BatchPacks(model, list(model.model.layers), max_packs=2, settle=3)
    for batch in (4, 4, 5, 4, 4):  # a change of size restarts the count
        packs.observe(batch)
    assert packs.get(4) is None and packs.built == 0
    packs.observe(4)
    pack = packs.get(4)
    assert pack is not None and pack.rows == 4 and packs.built == 1
    for _ in range(5):
        packs.observe(4)
    assert packs.built == 1  # packed once, then reused


def test_at_most_max_packs_are_held_least_recently_used_dropped(model: torch.nn.Module) -> None:
    packs = BatchPacks(model, list(model.model.layers), max_packs=2, settle=1)
    packs.observe(8)
    packs.observe(16)
    assert packs.get(8) is not None  # 8 is now the most recently used
    packs.observe(32)
    assert sorted(packs.packs) == [8, 32] and packs.built == 3


def test_a_declined_size_is_freed_and_never_packed_again(model: torch.nn.Module) -> None:
    packs = BatchPacks(model, list(model.model.layers), max_packs=1, settle=1)
    packs.observe(8)
    packs.decline(8)
    assert packs.get(8) is None
    packs.observe(8)
    assert packs.get(8) is None and packs.built == 1


def test_limits_must_be_positive(model: torch.nn.Module) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        BatchPacks(model, list(model.model.layers), max_packs=0)
