"""Deployment-wide hot-load on two real replicas: the root route named by the `fireworks-deployment`
header, the official SDK's delta chain, all-or-none loads (rollback), a crashed replica restarted while
the deployment reads DEGRADED, and a trainer re-attaching to a deployment left at zero replicas."""

from __future__ import annotations

import json
import os
import signal
import urllib.error
import urllib.request
from typing import Any

import pytest

ACCT = "/v1/accounts/local"
DEP = f"{ACCT}/deployments/multi"
HOT = f"{DEP}/hot_load/v1/models/hot_load"
ROOT_HOT = "/hot_load/v1/models/hot_load"
HEADER = {"fireworks-deployment": "accounts/local/deployments/multi", "fireworks-model": "firetitan/nano-qwen3"}


def _snapshots(home: Any) -> dict[str, str]:
    """Two bases and two deltas on the first, written straight into the store."""
    import torch

    from firetitan.checkpoints import SnapshotStore
    from firetitan.models import load_model

    model = load_model("firetitan/nano-qwen3")
    store = SnapshotStore(home / "store")
    sd = {k: v for k, v in model.state_dict().items()}

    def moved(scale: float) -> dict[str, torch.Tensor]:
        return {k: v * scale if v.is_floating_point() else v for k, v in sd.items()}

    with torch.no_grad():
        base = store.save_base("base", moved(1.01), model.config, base_model="firetitan/nano-qwen3", client_suffix="t0")
        other = store.save_base("other", moved(0.99), model.config, base_model="firetitan/nano-qwen3",
                                client_suffix="t0")
        d1 = store.save_delta("d1", moved(1.02), base.identity, client_suffix="t0")
        d2 = store.save_delta("d2", moved(1.03), base.identity, client_suffix="t0")
    return {"base": base.identity, "other": other.identity, "d1": d1.identity, "d2": d2.identity}


def _call(url: str, key: str, method: str, body: Any = None, headers: dict[str, str] | None = None
          ) -> tuple[int, Any]:
    req = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(), method=method,
                                 headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json",
                                          **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _served(status: dict[str, Any]) -> list[tuple[int, str | None]]:
    return [(r["replica_index"], r["current_snapshot_identity"]) for r in status["replicas"]]


@pytest.mark.slow
def test_two_replicas_load_all_or_none_restart_and_reattach(control_plane: Any) -> None:
    cp = control_plane
    snap = _snapshots(cp.home)
    cp.ok("POST", f"{ACCT}/deployments?deploymentId=multi",
          {"baseModel": "firetitan/nano-qwen3", "minReplicaCount": 2, "maxReplicaCount": 2})
    dep = cp.wait_for(DEP, lambda d: d["state"] == "READY" and d["replicaCount"] == 2)

    # The root route, as the official SDK calls it (no mode: ASYNC; it answers once every replica swapped).
    status, loaded = _call(cp.url + ROOT_HOT, cp.api_key, "POST",
                           {"identity": snap["base"], "reset_prompt_cache": True}, HEADER)
    assert status == 200, loaded
    assert _served(loaded) == [(0, snap["base"]), (1, snap["base"])]
    status, state = _call(cp.url + ROOT_HOT, cp.api_key, "GET", headers=HEADER)
    assert status == 200 and _served(state) == [(0, snap["base"]), (1, snap["base"])]
    assert state["replicas"][0]["readiness"] and state["loading_state"]["target_snapshot_identity"] == snap["base"]
    status, err = _call(cp.url + ROOT_HOT, cp.api_key, "GET")
    assert status == 400 and err["error"]["field"] == "fireworks-deployment"

    # The official SDK's chain: each delta names the snapshot loaded last; the record keeps the true base.
    meta = {"compression_format": "arc_v2", "checksum_format": "sha256"}
    for identity, previous in ((snap["d1"], snap["base"]), (snap["d2"], snap["d1"])):
        status, out = _call(cp.url + ROOT_HOT, cp.api_key, "POST", {"identity": identity, "incremental_snapshot_metadata": {
            "previous_snapshot_identity": previous, **meta}}, HEADER)
        assert status == 200, out
    chain = cp.ok("GET", DEP)["snapshotChain"]
    assert chain == [{"identity": snap["base"]}, {"identity": snap["d2"], "previousSnapshotIdentity": snap["base"]}]
    assert _served(cp.ok("GET", HOT)) == [(0, snap["d2"]), (1, snap["d2"])]

    # All or none: replica 1 is put on another base behind the control plane's back, so the next delta
    # fails there; replica 0, which switched, is rolled back to what the deployment serves.
    replica1 = next(r for r in dep["replicas"] if r["index"] == 1)
    status, out = _call(replica1["url"] + ROOT_HOT, cp.api_key, "POST", {"identity": snap["other"]})
    assert status == 200, out
    status, out = cp.call("POST", HOT, {"identity": snap["d1"]})
    assert status == 409 and out["error"]["message"].startswith("replica 1:")
    assert "rolled back replicas [0]" in out["error"]["message"]
    state = cp.ok("GET", HOT)
    assert _served(state) == [(0, snap["d2"]), (1, snap["other"])]
    assert state["current_snapshot_identity"] == snap["d2"]
    assert {(r["loading_state"]["stage"], r["loading_state"]["target_snapshot_identity"])
            for r in state["replicas"]} == {("rolled_back", snap["d1"])}
    assert cp.ok("GET", DEP)["snapshotChain"] == chain  # nothing recorded

    # A crashed replica: DEGRADED (not FAILED) while replica 0 serves, then restarted with the chain.
    os.kill(replica1["pid"], signal.SIGKILL)
    degraded = cp.wait_for(DEP, lambda d: d["state"] != "READY", timeout=60)
    assert degraded["state"] == "DEGRADED" and "restarting it in" in degraded["status"]["message"]
    assert cp.call("POST", f"{DEP}/inference/v1/completions", {"prompt": [5, 6], "max_tokens": 2})[0] == 200
    cp.wait_for(DEP, lambda d: d["state"] == "READY" and d["replicaCount"] == 2)
    assert _served(cp.ok("GET", HOT)) == [(0, snap["d2"]), (1, snap["d2"])]

    # Re-attach: left at zero, a PATCH of hotLoadTrainerJob brings back the last count (UPDATING, then READY).
    assert cp.ok("PATCH", DEP, {"minReplicaCount": 0, "maxReplicaCount": 0})["replicaCount"] == 0
    assert cp.worker_pids() == []
    patched = cp.ok("PATCH", DEP, {"hotLoadTrainerJob": "accounts/local/rlorTrainerJobs/next-run"})
    assert patched["state"] == "UPDATING" and patched["maxReplicaCount"] == 2
    dep = cp.wait_for(DEP, lambda d: d["state"] == "READY" and d["replicaCount"] == 2)
    assert dep["hotLoadTrainerJob"] == "accounts/local/rlorTrainerJobs/next-run"
    assert _served(cp.ok("GET", HOT)) == [(0, snap["d2"]), (1, snap["d2"])]
    cp.ok("DELETE", DEP)
    assert cp.worker_pids() == []
