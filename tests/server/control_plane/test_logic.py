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


def test_router_survives_forget_while_a_request_is_in_flight() -> None:
    router = ReplicaRouter()
    with router.track("d", 0):
        router.forget("d")  # the deployment was deleted mid-request
        assert router.outstanding("d", 0) == 0
        with router.track("d", 0):  # a new deployment of the same name starts counting afresh
            assert router.outstanding("d", 0) == 1
        assert router.outstanding("d", 0) == 0
    assert router.outstanding("d", 0) == 0  # the orphan's finally neither raised nor touched the new count


def test_hot_load_header_names_the_deployment() -> None:
    from firetitan.server.control_plane.hotload import deployment_from_header

    assert deployment_from_header("accounts/local/deployments/dep-1") == ("local", "dep-1")
    for bad in (None, "", "dep-1", "accounts/local/models/x", "accounts//deployments/x"):
        with pytest.raises(InvalidRequestError) as err:
            deployment_from_header(bad)
        assert err.value.field == "fireworks-deployment"


def test_shape_versions_carry_the_snapshot_the_official_sdk_reads() -> None:
    profile = resolve_shape("nano-qwen3-cpu").profile()
    snapshot = profile["snapshot"]
    assert isinstance(snapshot, dict)
    assert snapshot["deploymentShapeVersion"] == "accounts/local/deploymentShapes/nano-qwen3-cpu/versions/1"
    assert snapshot["maxSupportedContextLength"] == 512 and snapshot["trainerMode"] == "POLICY_TRAINER"


async def test_one_wait_raises_on_a_reported_failure_and_on_timeout() -> None:
    from firetitan.errors import APITimeoutError, SnapshotError
    from firetitan.server.deployment.schemas import HotLoadStatus, wait_until_serving

    def status(stage: str, current: str | None, ready: bool = True, count: int = 2) -> HotLoadStatus:
        replica = {"readiness": ready, "current_snapshot_identity": current,
                   "loading_state": {"stage": stage, "target_snapshot_identity": "x"}}
        return HotLoadStatus.model_validate({"replica_count": count, "replicas": [
            {**replica, "replica_index": 0}, {**replica, "replica_index": 1}]})

    answers = iter([status("loading", "old", ready=False), status("done", "x")])

    async def fetch() -> HotLoadStatus:
        return next(answers)

    done = await wait_until_serving(fetch, "x", 60, where="d", poll_s=0)
    assert [r.current_snapshot_identity for r in done.replicas] == ["x", "x"]
    # One replica of a deployment of three is not "every replica".
    assert not status("done", "x", count=3).all_serving("x")

    async def failing() -> HotLoadStatus:
        return status("error", "old")

    with pytest.raises(SnapshotError, match="failed to load 'x'"):
        await wait_until_serving(failing, "x", 60, where="d", poll_s=0)

    async def stuck() -> HotLoadStatus:
        return status("swapping", "old", ready=False)

    with pytest.raises(APITimeoutError) as err:
        await wait_until_serving(stuck, "x", 0, where="d", poll_s=0)
    assert "swapping" in err.value.message


def test_device_and_dtype_come_from_the_request_then_the_server_then_the_shape(tmp_path) -> None:
    import dataclasses

    from firetitan.server.control_plane.controller import Settings
    from firetitan.server.control_plane.jobs import _resolve_training_config
    from firetitan.server.control_plane.resources import TrainingConfig

    shape = dataclasses.replace(resolve_shape("nano-qwen3-cpu"), device="cpu", dtype="bfloat16")
    plain = TrainingConfig(base_model="firetitan/nano-qwen3")
    got = _resolve_training_config(plain, None, tmp_path, Settings())
    assert (got.device, got.dtype) == ("auto", "float32")
    got = _resolve_training_config(plain, shape, tmp_path, Settings())
    assert (got.device, got.dtype) == ("cpu", "bfloat16")
    got = _resolve_training_config(plain, shape, tmp_path, Settings(device="cuda:1", dtype="float32"))
    assert (got.device, got.dtype) == ("cuda:1", "float32")
    mine = TrainingConfig(base_model="firetitan/nano-qwen3", device="mps", dtype="bf16")
    got = _resolve_training_config(mine, shape, tmp_path, Settings(device="cuda:1", dtype="float32"))
    assert (got.device, got.dtype) == ("mps", "bfloat16")
