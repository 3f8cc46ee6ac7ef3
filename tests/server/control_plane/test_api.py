"""Control-plane HTTP API without workers: auth, validation, shapes, records across restarts."""

from __future__ import annotations

import os
import stat
from typing import Any

import pytest

from firetitan.errors import WorkerCrashedError
from firetitan.server.control_plane.home import HomeLayout, read_discovery

ControlPlaneProc = Any

ACCT = "/v1/accounts/local"


def test_every_route_but_health_needs_the_api_key(control_plane: ControlPlaneProc) -> None:
    key_file = control_plane.home / "api_key"
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
    for method, path in [("GET", f"{ACCT}/rlorTrainerJobs"), ("GET", f"{ACCT}/deployments"),
                         ("POST", f"{ACCT}/deployments"), ("GET", f"{ACCT}/trainingShapes"),
                         ("POST", "/training/v1/rlorTrainerJobs/local/x/api/v1/forward"),
                         ("POST", f"{ACCT}/deployments/x/inference/v1/completions")]:
        status, body = control_plane.call(method, path, {}, key=None)
        assert status == 401, (method, path, body)
        assert body["error"]["type"] == "AuthenticationError"
        status, _ = control_plane.call(method, path, {}, key="wrong-key")
        assert status == 401
    assert control_plane.call("GET", "/health", key=None)[0] == 200
    assert control_plane.call("GET", f"{ACCT}/rlorTrainerJobs")[0] == 200


def test_discovery_file_names_the_running_server(control_plane: ControlPlaneProc) -> None:
    info = read_discovery(_layout(control_plane))
    assert info == {"url": control_plane.url, "pid": control_plane.worker.pid}


def test_training_shapes_resolve_trainer_and_deployment_settings(control_plane: ControlPlaneProc) -> None:
    names = [s["name"] for s in control_plane.ok("GET", f"{ACCT}/trainingShapes")["trainingShapes"]]
    assert "accounts/local/trainingShapes/tiny-qwen3-cpu" in names
    versions = control_plane.ok("GET", f"{ACCT}/trainingShapes/nano-qwen3-cpu/versions")["trainingShapeVersions"]
    assert versions[0]["baseModel"] == "firetitan/nano-qwen3"
    assert versions[0]["deploymentShape"] == "accounts/local/deploymentShapes/nano-qwen3-cpu"
    assert versions[0]["trainerMode"] == "POLICY_TRAINER"
    exact = control_plane.ok("GET", f"{ACCT}/trainingShapes/nano-qwen3-cpu/versions/1")
    assert exact == versions[0]
    status, body = control_plane.call("GET", f"{ACCT}/trainingShapes/no-such-shape/versions")
    assert status == 404 and body["error"]["field"] == "trainingShape"


def test_bad_requests_get_400_naming_the_field(control_plane: ControlPlaneProc) -> None:
    cases = [
        (f"{ACCT}/rlorTrainerJobs?rlorTrainerJobId=Bad_Id", {"trainingConfig": {"baseModel": "firetitan/nano-qwen3"}},
         400, "rlorTrainerJobId"),
        (f"{ACCT}/rlorTrainerJobs", {"trainingConfig": {}}, 400, "trainingConfig.baseModel"),
        (f"{ACCT}/rlorTrainerJobs", {"trainingConfig": {"baseModel": "firetitan/nano-qwen3", "loraRank": -1}},
         400, "trainingConfig.loraRank"),
        (f"{ACCT}/rlorTrainerJobs", {"trainingConfig": {"baseModel": "firetitan/nano-qwen3", "worldSize": 9}},
         400, "trainingConfig.worldSize"),
        (f"{ACCT}/rlorTrainerJobs", {"trainingConfig": {"baseModel": "firetitan/nano-qwen3", "worldSize": 0}},
         400, "trainingConfig.worldSize"),
        (f"{ACCT}/rlorTrainerJobs", {"trainingConfig": {"baseModel": "firetitan/nano-qwen3", "worldSize": 2,
                                                        "loraRank": 8}}, 400, "trainingConfig.worldSize"),
        (f"{ACCT}/rlorTrainerJobs", {"trainingConfig": {"baseModel": "no/such-model"}}, 404,
         "trainingConfig.baseModel"),
        (f"{ACCT}/rlorTrainerJobs?trainingShape=accounts/local/trainingShapes/tiny-qwen3-cpu",
         {"trainingConfig": {"baseModel": "firetitan/nano-qwen3"}}, 400, "trainingConfig.baseModel"),
        (f"{ACCT}/rlorTrainerJobs", {"trainingConfig": {"baseModel": "firetitan/nano-qwen3"},
                                     "inactivityTimeout": "soon"}, 400, "inactivityTimeout"),
        (f"{ACCT}/deployments", {"baseModel": "firetitan/nano-qwen3", "maxReplicaCount": 99}, 400,
         "maxReplicaCount"),
        (f"{ACCT}/deployments", {"minReplicaCount": 0}, 400, "baseModel"),
        (f"{ACCT}/rlorTrainerJobs", {"trainingConfig": {"baseModel": "firetitan/nano-qwen3", "device": "gpu"}},
         400, "trainingConfig.device"),
        (f"{ACCT}/rlorTrainerJobs", {"trainingConfig": {"baseModel": "firetitan/nano-qwen3", "dtype": "float16"}},
         400, "trainingConfig.dtype"),
        (f"{ACCT}/deployments", {"baseModel": "firetitan/nano-qwen3", "dtype": "fp8"}, 400, "dtype"),
        (f"{ACCT}/deployments", {"baseModel": "firetitan/nano-qwen3", "device": "tpu"}, 400, "device"),
        (f"{ACCT}/deployments?deploymentId=UPPER", {"baseModel": "firetitan/nano-qwen3"}, 400, "deploymentId"),
    ]
    for path, body, want_status, field in cases:
        status, payload = control_plane.call("POST", path, body)
        assert status == want_status, (path, payload)
        assert payload["error"]["field"] == field, (path, payload)
    status, payload = control_plane.call("POST", f"{ACCT}/deployments", None)
    assert status == 400 and payload["error"]["field"] == "body"
    assert control_plane.call("GET", f"{ACCT}/rlorTrainerJobs/missing")[0] == 404
    assert control_plane.call("DELETE", f"{ACCT}/deployments/missing")[0] == 404
    assert control_plane.ok("GET", f"{ACCT}/rlorTrainerJobs")["rlorTrainerJobs"] == []
    assert control_plane.worker_pids() == []


def test_deployment_records_scale_and_survive_a_restart(control_plane: ControlPlaneProc, start_cp: Any) -> None:
    body = {"baseModel": "firetitan/nano-qwen3", "minReplicaCount": 0, "maxReplicaCount": 0,
            "deploymentShape": "accounts/local/deploymentShapes/nano-qwen3-cpu"}
    dep = control_plane.ok("POST", f"{ACCT}/deployments?deploymentId=kept", body)
    assert dep["name"] == "accounts/local/deployments/kept"
    assert dep["inferenceUrl"] == f"{control_plane.url}/v1/accounts/local/deployments/kept"
    assert control_plane.call("POST", f"{ACCT}/deployments?deploymentId=kept", body)[0] == 409
    control_plane.ok("POST", f"{ACCT}/deployments?deploymentId=gone", body)
    control_plane.ok("DELETE", f"{ACCT}/deployments/gone")
    assert control_plane.call("GET", f"{ACCT}/deployments/gone")[0] == 404
    # No replica: inference and hot-load are refused with retryable / conflict statuses, not crashes.
    status, _ = control_plane.call("POST", f"{ACCT}/deployments/kept/inference/v1/completions",
                                   {"prompt": [1, 2], "max_tokens": 2})
    assert status == 503
    status, payload = control_plane.call("POST", f"{ACCT}/deployments/kept/hot_load/v1/models/hot_load",
                                         {"identity": "x-1"})
    assert status == 409 and payload["error"]["field"] == "deploymentId"
    status, payload = control_plane.call("POST", f"{ACCT}/deployments/kept/hot_load/v1/models/hot_load",
                                         {"identity": "../etc"})
    assert status == 400 and payload["error"]["field"] == "identity"

    control_plane.stop()
    restarted = start_cp(control_plane.home)
    try:
        deps = restarted.ok("GET", f"{ACCT}/deployments")["deployments"]
        assert [d["name"] for d in deps] == ["accounts/local/deployments/kept"]
        assert deps[0]["deploymentShape"] == "accounts/local/deploymentShapes/nano-qwen3-cpu"
        assert deps[0]["state"] == "READY" and deps[0]["maxReplicaCount"] == 0
        assert read_discovery(_layout(restarted))["pid"] == restarted.worker.pid
    finally:
        restarted.stop()
    assert read_discovery(_layout(restarted)) is None


def test_a_second_server_for_the_same_state_dir_is_refused(control_plane: ControlPlaneProc,
                                                            start_cp: Any) -> None:
    with pytest.raises(WorkerCrashedError, match="already running"):
        start_cp(control_plane.home)
    assert control_plane.call("GET", "/health")[0] == 200


def test_off_loopback_needs_an_explicit_key(tmp_path) -> None:
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("FIRETITAN_API_KEY", "FIRETITAN_WORKER_API_KEY")}
    proc = subprocess.run([sys.executable, "-m", "firetitan.server.control_plane", "--home", str(tmp_path),
                           "--host", "0.0.0.0", "--port", "0"], capture_output=True, text=True, timeout=60,
                          env=env)
    assert proc.returncode == 2
    assert "api-key" in proc.stderr


def _layout(cp: ControlPlaneProc) -> HomeLayout:
    return HomeLayout(cp.home.resolve())


def test_firetitan_status_lists_jobs_and_deployments(control_plane: ControlPlaneProc) -> None:
    import json
    import subprocess
    import sys

    control_plane.ok("POST", f"{ACCT}/deployments?deploymentId=listed",
                     {"baseModel": "firetitan/nano-qwen3", "minReplicaCount": 0, "maxReplicaCount": 0})
    cli = [sys.executable, "-m", "firetitan.cli"]
    proc = subprocess.run([*cli, "status", "--home", str(control_plane.home), "--json"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    listed = json.loads(proc.stdout)
    assert listed["url"] == control_plane.url
    assert [d["name"] for d in listed["deployments"]] == ["accounts/local/deployments/listed"]
    assert listed["rlorTrainerJobs"] == []
    table = subprocess.run([*cli, "status", "--home", str(control_plane.home)], capture_output=True, text=True,
                           timeout=120)
    assert table.returncode == 0 and "listed" in table.stdout
    serve = subprocess.run([*cli, "serve", "--home", str(control_plane.home / "other"), "--host", "0.0.0.0"],
                           capture_output=True, text=True, timeout=120,
                           env={k: v for k, v in os.environ.items() if k != "FIRETITAN_API_KEY"})
    assert serve.returncode == 2 and "api-key" in serve.stdout
