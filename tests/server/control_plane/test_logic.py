"""Pure control-plane logic: replica choice, thread split, snapshot chain, shapes, durations."""

from __future__ import annotations

import pytest

from firetitan.errors import InvalidRequestError, NotFoundError
from firetitan.server.control_plane.controller import split_threads
from firetitan.server.control_plane.hotload import next_chain as _next_chain
from firetitan.server.control_plane.resources import HotLoadRecord, parse_duration
from firetitan.server.control_plane.router import ReplicaRouter
from firetitan.server.control_plane.shapes import resolve_shape


def test_router_picks_the_replica_with_fewest_requests_in_flight() -> None:
    router = ReplicaRouter()
    assert router.choose("d", []) is None
    with router.track("d", 0), router.track("d", 0), router.track("d", 1):
        assert router.choose("d", [0, 1, 2]) == 2
        with router.track("d", 2):
            assert router.choose("d", [0, 1, 2]) in (1, 2)
            assert router.choose("d", [0, 1]) == 1
    assert router.outstanding("d", 0) == 0
    # Ties are taken in turn, so idle replicas share the load.
    assert {router.choose("d", [0, 1]) for _ in range(4)} == {0, 1}


def test_threads_are_split_between_trainer_and_replicas() -> None:
    assert split_threads(2, 1) == (1, 1)
    assert split_threads(16, 2) == (8, 4)
    assert split_threads(1, 3) == (1, 1)
    assert split_threads(8, 1, trainer=2, replica=3) == (2, 3)


def test_snapshot_chain_keeps_the_base_and_the_latest_delta() -> None:
    base = HotLoadRecord(identity="b-1")
    d1 = HotLoadRecord(identity="d1-1", previous_snapshot_identity="b-1")
    d2 = HotLoadRecord(identity="d2-1", previous_snapshot_identity="b-1")
    chain = _next_chain([], base)
    chain = _next_chain(chain, d1)
    assert [r.identity for r in chain] == ["b-1", "d1-1"]
    assert [r.identity for r in _next_chain(chain, d2)] == ["b-1", "d2-1"]
    assert [r.identity for r in _next_chain(chain, HotLoadRecord(identity="b-2"))] == ["b-2"]


def test_shapes_resolve_by_full_name_version_or_id() -> None:
    assert resolve_shape("accounts/local/trainingShapes/tiny-qwen3-cpu").base_model == "firetitan/tiny-qwen3"
    assert resolve_shape("accounts/fireworks/trainingShapes/nano-qwen3-cpu/versions/1").shape_id == "nano-qwen3-cpu"
    with pytest.raises(NotFoundError):
        resolve_shape("accounts/local/trainingShapes/nano-qwen3-cpu/versions/7")
    with pytest.raises(InvalidRequestError):
        resolve_shape("accounts/local/deploymentShapes/x/y")


def test_durations_parse_like_protobuf() -> None:
    assert parse_duration("600s", "f") == 600.0
    assert parse_duration(90, "f") == 90.0
    assert parse_duration(None, "f") is None
    with pytest.raises(InvalidRequestError) as err:
        parse_duration("-5s", "inactivityTimeout")
    assert err.value.field == "inactivityTimeout"
