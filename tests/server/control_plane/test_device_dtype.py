"""Device and dtype through the control plane: `serve --device/--dtype` defaults, a request's own setting
wins, and the workers really load in what the records say."""

from __future__ import annotations

import json
import urllib.request
from typing import Any

import pytest

ACCT = "/v1/accounts/local"


@pytest.mark.slow
def test_server_defaults_and_request_settings_reach_the_workers(tmp_path: Any, start_cp: Any) -> None:
    cp = start_cp(tmp_path / "home", "--device", "cpu", "--dtype", "bf16")
    dep = cp.ok("POST", f"{ACCT}/deployments?deploymentId=bf",
                {"baseModel": "firetitan/nano-qwen3", "minReplicaCount": 1, "maxReplicaCount": 1})
    assert (dep["device"], dep["dtype"]) == ("cpu", "bfloat16")  # the server's defaults
    job = cp.ok("POST", f"{ACCT}/rlorTrainerJobs?rlorTrainerJobId=fp",
                {"trainingConfig": {"baseModel": "firetitan/nano-qwen3", "dtype": "float32"}})
    assert (job["trainingConfig"]["device"], job["trainingConfig"]["dtype"]) == ("cpu", "float32")  # request wins
    dep = cp.wait_for(f"{ACCT}/deployments/bf", lambda d: d["state"] == "READY")
    req = urllib.request.Request(dep["replicas"][0]["url"] + "/health",
                                 headers={"Authorization": f"Bearer {cp.api_key}"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        health = json.loads(resp.read())
    assert (health["device"], health["dtype"]) == ("cpu", "bfloat16")
    cp.wait_for(f"{ACCT}/rlorTrainerJobs/fp", lambda j: j["state"] == "JOB_STATE_RUNNING")
    logs = "".join(p.read_text() for p in (tmp_path / "home" / "logs").glob("*.log"))
    assert any("model_loaded" in line and "device=cpu" in line and "dtype=float32" in line
               for line in logs.splitlines() if "firetitan.server.trainer" in line)
    cp.ok("DELETE", f"{ACCT}/deployments/bf")
    cp.ok("DELETE", f"{ACCT}/rlorTrainerJobs/fp")
