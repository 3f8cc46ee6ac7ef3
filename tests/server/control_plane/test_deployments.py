"""Deployments with real replicas: hot-load fan-out, routed streaming inference, scale to zero and
back and a control-plane restart (both replaying the served snapshot), and a crashed replica marking
the deployment FAILED."""

from __future__ import annotations

import json
import os
import signal
import urllib.request
from typing import Any

import pytest

ACCT = "/v1/accounts/local"
DEP = f"{ACCT}/deployments/dep"
HOT = f"{DEP}/hot_load/v1/models/hot_load"


def _save_base_and_delta(home: Any) -> tuple[str, str]:
    """A base snapshot of the nano model with its weights shifted, and a delta on it, written straight
    into the store."""
    import torch

    from firetitan.checkpoints import SnapshotStore
    from firetitan.models import load_model

    model = load_model("firetitan/nano-qwen3")
    store = SnapshotStore(home / "store")
    state = {k: v + 0.01 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    later = {k: v * 1.5 if v.is_floating_point() else v for k, v in state.items()}
    with torch.no_grad():
        base = store.save_base("shifted", state, model.config, base_model="firetitan/nano-qwen3", client_suffix="t0")
        delta = store.save_delta("later", later, base.identity, client_suffix="t0")
    return base.identity, delta.identity


def _stream(cp: Any, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    req = urllib.request.Request(cp.url + path, data=json.dumps(body).encode(), method="POST",
                                 headers={"Authorization": f"Bearer {cp.api_key}",
                                          "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        events = [line[6:] for line in resp.read().decode().splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


@pytest.mark.slow
def test_replicas_hot_load_route_scale_restart_and_fail(control_plane: Any, start_cp: Any,
                                                         home_workers: Any) -> None:
    cp = control_plane
    identity, delta = _save_base_and_delta(cp.home)
    dep = cp.ok("POST", f"{ACCT}/deployments?deploymentId=dep",
                {"baseModel": "firetitan/nano-qwen3", "minReplicaCount": 1, "maxReplicaCount": 1})
    assert dep["state"] == "CREATING"
    dep = cp.wait_for(DEP, lambda d: d["state"] == "READY")
    assert dep["replicaCount"] == 1 and len(cp.worker_pids()) == 1

    loaded = cp.ok("POST", HOT, {"identity": identity, "mode": "SYNC"})
    assert [r["replica_index"] for r in loaded["replicas"]] == [0]
    status = cp.wait_for(HOT, lambda s: [r["current_snapshot_identity"] for r in s["replicas"]] == [identity])
    assert status["current_snapshot_identity"] == identity and status["replicas"][0]["readiness"]
    # A delta posted without its base: the control plane fills the base in (the replica checks it) and
    # the ASYNC answer already says what every replica serves.
    loaded = cp.ok("POST", HOT, {"identity": delta})
    assert loaded["replica_count"] == 1
    assert [(r["current_snapshot_identity"], r["base_snapshot_identity"], r["readiness"])
            for r in loaded["replicas"]] == [(delta, identity, True)]
    bad = cp.call("POST", HOT, {"identity": "missing-t0"})
    assert bad[0] in (404, 409) and bad[1]["error"]["field"] == "identity"

    chunks = _stream(cp, f"{DEP}/inference/v1/completions",
                     {"prompt": [5, 6, 7], "max_tokens": 3, "stream": True, "raw_output": True})
    assert chunks and all(c["model"] for c in chunks)
    status_code, body = cp.call("POST", "/inference/v1/completions",
                                {"model": "accounts/local/deployments/dep", "prompt": [5, 6, 7], "max_tokens": 2})
    assert status_code == 200 and body["choices"][0]["text"] is not None

    # Scale to zero: the answer comes after the replica is gone; the record stays at zero.
    scaled = cp.ok("PATCH", DEP, {"minReplicaCount": 0, "maxReplicaCount": 0})
    assert scaled["replicaCount"] == 0 and scaled["maxReplicaCount"] == 0 and cp.worker_pids() == []
    assert cp.call("POST", f"{DEP}/inference/v1/completions", {"prompt": [5], "max_tokens": 1})[0] == 503
    # Back to one: the new replica loads what the deployment served before taking traffic: the base,
    # then the delta on it (recorded with its base though the client left it out).
    cp.ok("PATCH", DEP, {"minReplicaCount": 1, "maxReplicaCount": 1})
    dep = cp.wait_for(DEP, lambda d: d["state"] == "READY" and d["replicaCount"] == 1)
    assert [(r["current_snapshot_identity"], r["base_snapshot_identity"])
            for r in cp.ok("GET", HOT)["replicas"]] == [(delta, identity)]

    # A restarted control plane (its replicas went down with it) brings the deployment back with
    # a replica serving what it served before.
    cp.stop()
    assert home_workers(cp.home) == []
    cp = start_cp(cp.home)
    dep = cp.wait_for(DEP, lambda d: d["state"] == "READY" and d["replicaCount"] == 1)
    assert [(r["current_snapshot_identity"], r["base_snapshot_identity"])
            for r in cp.ok("GET", HOT)["replicas"]] == [(delta, identity)]
    assert len(cp.worker_pids()) == 1

    os.kill(dep["replicas"][0]["pid"], signal.SIGKILL)
    failed = cp.wait_for(DEP, lambda d: d["state"] == "FAILED", timeout=60)
    assert "exited with code -9" in failed["status"]["message"]
    cp.ok("DELETE", DEP)
    assert cp.call("GET", DEP)[0] == 404 and cp.worker_pids() == []
