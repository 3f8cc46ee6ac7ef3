"""The official fireworks-ai SDK's `DeploymentManager`, unmodified, against a local control plane:
hot-load at the root route, its delta chain, fail-fast on an error for its target, scale to zero and
trainer re-attach."""

from __future__ import annotations

from typing import Any

import pytest
from test_hot_load import _snapshots

ACCT = "/v1/accounts/local"
DEP = f"{ACCT}/deployments/sdk"
NANO = "firetitan/nano-qwen3"


@pytest.mark.slow
def test_official_deployment_manager_hot_loads_and_reattaches(control_plane: Any) -> None:
    from fireworks.training.sdk._snapshot_chain import build_incremental_metadata
    from fireworks.training.sdk.deployment import DeploymentManager

    cp = control_plane
    snap = _snapshots(cp.home)
    cp.ok("POST", f"{ACCT}/deployments?deploymentId=sdk",
          {"baseModel": NANO, "minReplicaCount": 1, "maxReplicaCount": 1})
    cp.wait_for(DEP, lambda d: d["state"] == "READY" and d["replicaCount"] == 1)
    manager = DeploymentManager(api_key=cp.api_key, base_url=cp.url)
    assert manager.account_id == "local"

    # The SDK's chain: base, then each delta pinned to the snapshot it loaded last.
    last = None
    for identity, kind in ((snap["base"], "base"), (snap["d1"], "delta"), (snap["d2"], "delta")):
        meta = build_incremental_metadata(lora_rank=0, checkpoint_type=kind, base_identity=last,
                                          compression_format="arc_v2")
        manager.hotload("sdk", NANO, identity, incremental_snapshot_metadata=meta)
        assert manager.wait_for_hotload("sdk", NANO, identity, timeout_seconds=120, poll_interval=1)
        last = identity
    status = manager.hotload_check_status("sdk", NANO)
    assert status["replicas"][0]["current_snapshot_identity"] == snap["d2"]
    assert status["replicas"][0]["base_snapshot_identity"] == snap["base"]

    # A load that fails: the status names the target in error, so the SDK's wait gives up at once.
    with pytest.raises(Exception, match="404"):
        manager.hotload("sdk", NANO, "missing-t0")
    assert manager.wait_for_hotload("sdk", NANO, "missing-t0", timeout_seconds=60, poll_interval=1) is False
    assert "missing-t0" in (manager.last_hotload_error_message or "")

    # Scale to zero, then a second run re-attaches: the deployment comes back with its replica and snapshot.
    manager.scale_to_zero("sdk")
    assert cp.ok("GET", DEP)["maxReplicaCount"] == 0 and cp.worker_pids() == []
    info = manager.reattach_trainer("sdk", base_model=NANO, trainer_job_name="accounts/local/rlorTrainerJobs/run-2",
                                    timeout_s=240, poll_interval_s=0.5)
    assert info.state == "READY" and info.hot_load_trainer_job == "accounts/local/rlorTrainerJobs/run-2"
    dep = cp.ok("GET", DEP)
    assert dep["replicaCount"] == 1
    assert manager.hotload_check_status("sdk", NANO)["replicas"][0]["current_snapshot_identity"] == snap["d2"]
    cp.ok("DELETE", DEP)
