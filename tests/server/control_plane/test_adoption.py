"""A control plane killed outright: its workers wait a grace period; a control plane restarted on the
same home within it adopts them (same pids, same served snapshot); without one they stop by themselves."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import pytest
from test_hot_load import _snapshots

from firetitan.server.process import pid_alive

ACCT = "/v1/accounts/local"
DEP = f"{ACCT}/deployments/kept"
HOT = f"{DEP}/hot_load/v1/models/hot_load"
JOB = f"{ACCT}/rlorTrainerJobs/kept-trainer"


@pytest.mark.slow
def test_restarted_control_plane_adopts_live_workers_and_orphans_stop(start_cp: Any, tmp_path: Any) -> None:
    home = tmp_path / "home"
    cp = start_cp(home, "--worker-grace", "20")
    snap = _snapshots(home)
    cp.ok("POST", f"{ACCT}/deployments?deploymentId=kept",
          {"baseModel": "firetitan/nano-qwen3", "minReplicaCount": 1, "maxReplicaCount": 1})
    dep = cp.wait_for(DEP, lambda d: d["state"] == "READY" and d["replicaCount"] == 1)
    cp.ok("POST", HOT, {"identity": snap["base"]})
    pid = dep["replicas"][0]["pid"]
    cp.ok("POST", f"{ACCT}/rlorTrainerJobs?rlorTrainerJobId=kept-trainer",
          {"trainingConfig": {"baseModel": "firetitan/nano-qwen3"}})
    trainer_pid = cp.wait_for(JOB, lambda j: j["state"] == "JOB_STATE_RUNNING")["pid"]

    os.kill(cp.worker.pid, signal.SIGKILL)
    cp.worker.popen.wait(timeout=10)
    assert pid_alive(pid)  # the replica outlives the crash ...
    again = start_cp(home, "--worker-grace", "5")
    dep = again.ok("GET", DEP)  # ... and the new control plane adopts it before answering
    assert dep["state"] == "READY" and [r["pid"] for r in dep["replicas"]] == [pid]
    # Adoption asked each worker's health listener (its own port, recorded at start), not its API port.
    assert dep["replicas"][0]["healthUrl"] not in (None, dep["replicas"][0]["url"])
    assert again.ok("GET", HOT)["replicas"][0]["current_snapshot_identity"] == snap["base"]
    job = again.ok("GET", JOB)
    assert (job["state"], job["pid"]) == ("JOB_STATE_RUNNING", trainer_pid)
    assert job["healthUrl"] not in (None, job["trainerUrl"])
    info = again.ok("POST", "/training/v1/rlorTrainerJobs/local/kept-trainer/api/v1/get_info",
                    {"model_id": "kept-trainer"})
    assert "nano" in str(info)  # the adopted trainer answers through the gateway
    time.sleep(3)  # past the old parent's death: the replica now watches the new control plane
    assert pid_alive(pid)
    assert again.call("POST", f"{DEP}/inference/v1/completions", {"prompt": [5, 6], "max_tokens": 2})[0] == 200

    # No control plane comes back: the replica stops by itself once its grace period (20 s) is over.
    os.kill(again.worker.pid, signal.SIGKILL)
    again.worker.popen.wait(timeout=10)
    deadline = time.monotonic() + 60
    while (pid_alive(pid) or pid_alive(trainer_pid)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not pid_alive(pid) and not pid_alive(trainer_pid)
    third = start_cp(home)
    dep = third.wait_for(DEP, lambda d: d["state"] == "READY" and d["replicaCount"] == 1)
    assert [r["pid"] for r in dep["replicas"]] != [pid]  # a fresh replica, replaying the chain
    assert third.ok("GET", HOT)["replicas"][0]["current_snapshot_identity"] == snap["base"]
    job = third.ok("GET", JOB)
    assert job["state"] == "JOB_STATE_FAILED" and "restarted" in job["status"]["message"]
    third.ok("DELETE", DEP)
