"""The model-alias table in the control plane: hosted shape and model names resolve to local models
before any worker starts; a hosted name with no alias is an error naming the table and the command;
the `fw_` spelling of the home's key authenticates; a deployment woken by a trainer's re-attach goes
back to zero when that trainer job is deleted."""

from __future__ import annotations

from typing import Any

import pytest

from firetitan.home import fireworks_api_key
from firetitan.models.aliases import ALIASES_FILE, set_alias

ACCT = "/v1/accounts/local"
QWEN = "accounts/fireworks/models/qwen3-8b"
SHAPE = "accounts/fireworks/trainingShapes/qwen3-8b-128k-h200"
NANO = "firetitan/nano-qwen3"


def _assert_names_the_table(body: dict[str, Any], name: str, field: str) -> None:
    message = body["error"]["message"]
    assert body["error"]["field"] == field
    assert ALIASES_FILE in message and f"firetitan models alias {name}" in message, message


def test_hosted_shape_names_resolve_through_the_alias_table(control_plane: Any) -> None:
    cp = control_plane
    status, body = cp.call("GET", f"/v1/{SHAPE}/versions?filter=latest_validated=true&pageSize=1")
    assert status == 404
    _assert_names_the_table(body, SHAPE, "trainingShape")

    set_alias(cp.home, SHAPE, NANO)
    version = cp.ok("GET", f"/v1/{SHAPE}/versions?filter=latest_validated=true&pageSize=1")["trainingShapeVersions"][0]
    local = cp.ok("GET", f"{ACCT}/trainingShapes/nano-qwen3-cpu/versions")["trainingShapeVersions"][0]
    assert version == local
    assert version["snapshot"]["deploymentShapeVersion"] == "accounts/local/deploymentShapes/nano-qwen3-cpu/versions/1"
    assert cp.ok("GET", f"/v1/{SHAPE}")["baseModel"] == NANO
    # Any version of an aliased shape is its local shape's one version.
    assert cp.ok("GET", f"/v1/{SHAPE}/versions/abc123")["name"] == local["name"]
    # Unknown local shapes keep their plain not-found answer.
    status, body = cp.call("GET", f"{ACCT}/trainingShapes/no-such-shape/versions")
    assert status == 404 and ALIASES_FILE not in body["error"]["message"]


def test_hosted_base_models_need_an_alias_and_records_hold_the_local_model(control_plane: Any) -> None:
    cp = control_plane
    status, body = cp.call("POST", f"{ACCT}/deployments?deploymentId=hosted",
                           {"baseModel": QWEN, "minReplicaCount": 0, "maxReplicaCount": 0})
    assert status == 404
    _assert_names_the_table(body, QWEN, "baseModel")
    status, body = cp.call("POST", f"{ACCT}/rlorTrainerJobs?rlorTrainerJobId=hosted",
                           {"trainingConfig": {"baseModel": QWEN}})
    assert status == 404
    _assert_names_the_table(body, QWEN, "trainingConfig.baseModel")
    assert cp.call("GET", f"{ACCT}/rlorTrainerJobs/hosted")[0] == 404  # nothing was recorded or started

    set_alias(cp.home, QWEN, NANO)
    dep = cp.ok("POST", f"{ACCT}/deployments?deploymentId=hosted",
                {"baseModel": QWEN, "deploymentShape": "accounts/local/deploymentShapes/nano-qwen3-cpu",
                 "minReplicaCount": 0, "maxReplicaCount": 0})
    assert dep["baseModel"] == NANO
    # A hosted model aliased to a model the shape does not train is refused like any mismatch.
    set_alias(cp.home, QWEN, "firetitan/tiny-qwen3")
    status, body = cp.call("POST", f"{ACCT}/rlorTrainerJobs?rlorTrainerJobId=mismatch&trainingShape="
                           "accounts/local/trainingShapes/nano-qwen3-cpu", {"trainingConfig": {"baseModel": QWEN}})
    assert status == 400 and body["error"]["field"] == "trainingConfig.baseModel"


def test_the_fireworks_spelling_of_the_key_authenticates(control_plane: Any) -> None:
    cp = control_plane
    assert cp.api_key.startswith("tml-")
    spelled = fireworks_api_key(cp.api_key)
    assert spelled.startswith("fw_") and spelled[3:] == cp.api_key[4:]
    assert cp.call("GET", "/v1/accounts", key=spelled)[0] == 200
    assert cp.call("GET", "/v1/accounts", key=spelled[:-1] + ("A" if spelled[-1] != "A" else "B"))[0] == 401
    assert cp.call("GET", "/v1/accounts", key="fw_" + cp.api_key)[0] == 401


@pytest.mark.slow
def test_a_deployment_woken_by_a_reattach_returns_to_zero_when_its_trainer_job_is_deleted(control_plane: Any) -> None:
    cp = control_plane
    set_alias(cp.home, QWEN, NANO)
    set_alias(cp.home, SHAPE, NANO)
    dep_path = f"{ACCT}/deployments/woken"
    cp.ok("POST", f"{ACCT}/deployments?deploymentId=woken", {"baseModel": QWEN, "minReplicaCount": 1,
                                                              "maxReplicaCount": 1})
    cp.wait_for(dep_path, lambda d: d["state"] == "READY" and d["replicaCount"] == 1)
    cp.ok("PATCH", f"{dep_path}?updateMask=min_replica_count,max_replica_count",
          {"minReplicaCount": 0, "maxReplicaCount": 0})
    assert cp.worker_pids() == []

    job = cp.ok("POST", f"{ACCT}/rlorTrainerJobs?rlorTrainerJobId=run-2&trainingShape={SHAPE}",
                {"trainingConfig": {"baseModel": QWEN}})
    assert job["trainingConfig"]["baseModel"] == NANO
    cp.wait_for(f"{ACCT}/rlorTrainerJobs/run-2", lambda j: j["state"] == "JOB_STATE_RUNNING")
    # The official SDK's create_model names the hosted model: the gateway hands the trainer the local
    # one, which is the job's preloaded model (reused, not loaded twice).
    gateway = "/training/v1/rlorTrainerJobs/local/run-2/api/v1"
    session = cp.ok("POST", f"{gateway}/create_session", {"tags": [], "user_metadata": None,
                                                           "sdk_version": "test", "type": "create_session"})
    created = cp.ok("POST", f"{gateway}/create_model", {"session_id": session["session_id"], "model_seq_id": 0,
                                                        "base_model": QWEN, "type": "create_model"})
    result = cp.ok("POST", f"{gateway}/retrieve_future", {"request_id": created["request_id"]})
    assert result["model_name"] == NANO, result
    assert created["model_id"] == result["model_id"] and result["model_id"].startswith("run-2"), (created, result)

    cp.ok("PATCH", f"{dep_path}?updateMask=hot_load_trainer_job",
          {"hotLoadTrainerJob": "accounts/local/rlorTrainerJobs/run-2"})
    cp.wait_for(dep_path, lambda d: d["state"] == "READY" and d["replicaCount"] == 1)
    assert len(cp.worker_pids()) == 2

    cp.ok("DELETE", f"{ACCT}/rlorTrainerJobs/run-2")
    dep = cp.ok("GET", dep_path)
    assert dep["maxReplicaCount"] == 0 and dep["replicaCount"] == 0
    assert cp.worker_pids() == []
    # An explicitly scaled deployment is not the trainer's to release.
    cp.ok("PATCH", f"{dep_path}?updateMask=max_replica_count", {"maxReplicaCount": 1})
    cp.wait_for(dep_path, lambda d: d["state"] == "READY" and d["replicaCount"] == 1)
    cp.ok("POST", f"{ACCT}/rlorTrainerJobs?rlorTrainerJobId=run-3", {"trainingConfig": {"baseModel": QWEN}})
    cp.ok("PATCH", f"{dep_path}?updateMask=hot_load_trainer_job",
          {"hotLoadTrainerJob": "accounts/local/rlorTrainerJobs/run-3"})
    cp.ok("DELETE", f"{ACCT}/rlorTrainerJobs/run-3")
    assert cp.ok("GET", dep_path)["maxReplicaCount"] == 1
    cp.ok("DELETE", dep_path)
