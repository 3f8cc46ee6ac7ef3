"""How a batch is split over ranks and how the ranks' metrics are merged back (no processes)."""

from __future__ import annotations

import pytest
import torch
from test_trainer_worker import batch

from firetitan.errors import InvalidRequestError
from firetitan.server.trainer.batch import prepare_batch
from firetitan.server.trainer.distributed.group import check_world_size, rank_device
from firetitan.server.trainer.distributed.split import merge_metrics, split_batch, split_bounds


@pytest.mark.parametrize("n", [0, 1, 2, 3, 7, 8])
@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_split_bounds_cover_every_datum_once_in_order(n: int, world: int) -> None:
    bounds = [split_bounds(n, r, world) for r in range(world)]
    assert [i for s, e in bounds for i in range(s, e)] == list(range(n))
    sizes = [e - s for s, e in bounds]
    assert max(sizes) - min(sizes) <= 1


def test_split_batch_trims_padding_and_keeps_each_datum() -> None:
    data = batch(7, [9, 3, 4])  # rank 0: [9, 3] (padded), rank 1: [4] alone (no padding left)
    full = prepare_batch(data, "cross_entropy", None, 4096)
    first, second = split_batch(full, 0, 2), split_batch(full, 1, 2)
    assert first is not None and second is not None
    assert first.lengths == [9, 3] and first.input_ids.shape == (2, 9) and first.attention_mask is not None
    assert second.lengths == [4] and second.input_ids.shape == (1, 4) and second.attention_mask is None
    assert torch.equal(second.input_ids[0], full.input_ids[2, :4])
    assert all(torch.equal(a, b) for a, b in zip(first.targets + second.targets, full.targets, strict=True))
    assert split_batch(prepare_batch(data[:1], "cross_entropy", None, 4096), 1, 2) is None


def test_metrics_merge_by_their_reduction_suffix() -> None:
    merged = merge_metrics([({"loss:sum": 1.5, "ratio:mean": 1.0, "ratio:min": 0.5, "ratio:max": 2.0}, 3),
                            ({"loss:sum": 2.0, "ratio:mean": 2.0, "ratio:min": 0.25, "ratio:max": 1.0}, 1),
                            ({}, 0)])
    assert merged == {"loss:sum": 3.5, "ratio:mean": pytest.approx(1.25), "ratio:min": 0.25, "ratio:max": 2.0}


@pytest.mark.parametrize("bad", [0, 9, -1, 2.0])
def test_world_size_outside_1_to_8_is_refused_naming_the_field(bad: object) -> None:
    with pytest.raises(InvalidRequestError) as err:
        check_world_size(bad)  # type: ignore[arg-type]
    assert err.value.field == "world_size" and "1..8" in str(err.value)
    assert check_world_size(8) == 8


def test_cpu_ranks_share_the_device() -> None:
    assert rank_device(torch.device("cpu"), 1, 2) == torch.device("cpu")


def test_cuda_ranks_take_one_gpu_each_from_the_jobs_first(monkeypatch: pytest.MonkeyPatch) -> None:
    # torch's CUDA queries stand in for a 4-GPU host; the placement rule is ours.
    selected: list[int] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", selected.append)
    assert [rank_device(torch.device("cuda"), r, 4) for r in range(4)] == [torch.device("cuda", i) for i in range(4)]
    assert rank_device(torch.device("cuda:2"), 1, 2) == torch.device("cuda", 3)
    assert selected == [0, 1, 2, 3, 3]
    with pytest.raises(InvalidRequestError, match=r"world_size: 2 CUDA ranks starting at cuda:3 need GPUs 3..4, "
                                                  r"and this host has 4") as info:
        rank_device(torch.device("cuda:3"), 0, 2)
    assert info.value.field == "world_size" and selected == [0, 1, 2, 3, 3]


def test_cuda_ranks_on_a_host_without_gpus_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(InvalidRequestError, match="this host has 0"):
        rank_device(torch.device("cuda"), 0, 2)
