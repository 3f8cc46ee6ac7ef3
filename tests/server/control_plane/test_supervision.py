"""Worker supervision with a real trainer: crash -> FAILED, resume, idle stop, control-plane restart."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import pytest

from firetitan.server.process import pid_alive

ACCT = "/v1/accounts/local"
JOB = f"{ACCT}/rlorTrainerJobs/sup"


def wait_until_dead(pid: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pid_alive(pid)


def _running(job: dict[str, Any]) -> bool:
    assert job["state"] in ("JOB_STATE_CREATING", "JOB_STATE_RUNNING"), job
    return job["state"] == "JOB_STATE_RUNNING"


@pytest.mark.slow
def test_trainer_crash_resume_idle_stop_and_restart(start_cp: Any, tmp_path: Any) -> None:
    home = tmp_path / "home"
    # Health checks every 10 min: a crash must be noticed by the gateway call that meets it, not by the loop.
    cp = start_cp(home, "--trainer-idle-timeout", "8", "--health-interval", "600")
    created = cp.ok("POST", f"{ACCT}/rlorTrainerJobs?rlorTrainerJobId=sup&trainingShape=accounts/local/"
                            "trainingShapes/nano-qwen3-cpu", {"trainingConfig": {}})
    assert created["state"] == "JOB_STATE_CREATING"
    assert created["trainingConfig"]["baseModel"] == "firetitan/nano-qwen3"  # from the shape
    assert created["serviceUrl"] == f"{cp.url}/training/v1/rlorTrainerJobs/local/sup"
    job = cp.wait_for(JOB, _running)
    # The gateway forwards Tinker calls to the worker (and counts them as activity).
    info = cp.ok("POST", "/training/v1/rlorTrainerJobs/local/sup/api/v1/get_info", {"model_id": "sup"})
    assert info["model_name"] == "firetitan/nano-qwen3" or "nano" in str(info)
    assert cp.worker_pids() == [job["pid"]]

    os.kill(job["pid"], signal.SIGKILL)
    wait_until_dead(job["pid"])
    # The first call to meet the dead worker is told so (409, the SDK's WorkerCrashedError), and the
    # job is already FAILED when that answer arrives: a resume sent on it always relaunches.
    status, body = cp.call("POST", "/training/v1/rlorTrainerJobs/local/sup/api/v1/get_info", {"model_id": "sup"})
    assert status == 409 and "not running" in body["error"]["message"], (status, body)
    assert body["error"]["field"] == "rlorTrainerJobId"
    failed = cp.ok("GET", JOB)
    assert failed["state"] == "JOB_STATE_FAILED"
    assert "exited with code -9" in failed["status"]["message"]

    cp.ok("POST", f"{JOB}:resume")
    resumed = cp.wait_for(JOB, _running)
    assert resumed["pid"] != job["pid"]
    # No requests for 8 s: the idle timer stops the worker; the record says how to bring it back.
    paused = cp.wait_for(JOB, lambda j: j["state"] != "JOB_STATE_RUNNING", timeout=90)
    assert paused["state"] == "JOB_STATE_PAUSED" and "resume" in paused["status"]["message"]
    assert not pid_alive(resumed["pid"]) and cp.worker_pids() == []

    cp.ok("POST", f"{JOB}:resume")
    running = cp.wait_for(JOB, _running)
    # A control plane killed outright: its workers go with it, and the records survive the restart.
    os.kill(cp.worker.pid, signal.SIGKILL)
    cp.worker.popen.wait(timeout=10)
    wait_until_dead(running["pid"])
    again = start_cp(home, "--trainer-idle-timeout", "8")
    after = again.ok("GET", JOB)
    assert after["state"] == "JOB_STATE_FAILED" and "restarted" in after["status"]["message"]
    assert [j["name"] for j in again.ok("GET", f"{ACCT}/rlorTrainerJobs")["rlorTrainerJobs"]] == [
        "accounts/local/rlorTrainerJobs/sup"]
    again.ok("DELETE", JOB)
    assert again.ok("GET", JOB)["state"] == "JOB_STATE_DELETED"
    assert again.call("POST", f"{JOB}:resume")[0] == 409
