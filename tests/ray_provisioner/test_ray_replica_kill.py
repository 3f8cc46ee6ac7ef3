"""`provisioner: ray`: a replica whose Ray actor is killed is seen by the control plane and restarted, as
a killed local replica process is (tests/chaos/test_replica_kill.py); deleting leaves no actor."""

from __future__ import annotations

from typing import Any

import psutil
import pytest
import ray
from ray_home import ACCT, NAMESPACE, NANO, RayHome, firetitan_actors, wait_until

from firetitan.client.provision import ensure_control_plane
from firetitan.server.process import pid_alive

DEP_ID = "ray-dep"
DEP = f"{ACCT}/deployments/{DEP_ID}"


def _parent_cmdline(pid: int) -> str:
    return " ".join(psutil.Process(pid).parent().cmdline())


@pytest.mark.slow
def test_ray_kill_of_a_replica_actor_is_seen_and_recovered(home: RayHome) -> None:
    ensure_control_plane()
    call = home.http()
    status, body = call("POST", f"{ACCT}/deployments?deploymentId={DEP_ID}",
                        {"baseModel": NANO, "minReplicaCount": 2, "maxReplicaCount": 2})
    assert status == 200, body
    dep = home.wait_for(DEP, lambda d: d["state"] == "READY" and d["replicaCount"] == 2, timeout=300)
    actors = firetitan_actors()
    assert len(actors) == 2 and all(DEP_ID in a for a in actors), actors
    victim_pid = dep["replicas"][1]["pid"]
    survivor_pid = dep["replicas"][0]["pid"]
    # The worker runs under its actor (a Ray worker process), not under the control plane.
    assert "ray::" in _parent_cmdline(victim_pid) or "default_worker" in _parent_cmdline(victim_pid)
    # Served through the control plane's proxy, which learned the replicas' addresses from their actors.
    status, body = call("POST", "/inference/v1/completions", {"model": dep["name"], "prompt": [5, 6, 7], "max_tokens": 2})
    assert status == 200 and body["choices"][0]["text"] is not None, body
    victim_actor = next(a for a in actors if a.endswith("replica-1"))

    ray.kill(ray.get_actor(victim_actor, namespace=NAMESPACE))

    states: list[str] = []
    messages: list[str] = []

    def restarted(d: dict[str, Any]) -> bool:
        states.append(d["state"])
        messages.append(d["status"].get("message") or "")
        return d["state"] == "READY" and d["replicaCount"] == 2 and \
            victim_pid not in [r["pid"] for r in d["replicas"]]

    dep = home.wait_for(DEP, restarted, timeout=300)
    assert "DEGRADED" in states and "FAILED" not in states, states
    assert any("Ray actor" in m and "died" in m for m in messages), messages
    assert survivor_pid in [r["pid"] for r in dep["replicas"]]
    # The killed actor's worker stopped with it (its parent watchdog), and a new actor serves replica 1.
    assert wait_until(lambda: not pid_alive(victim_pid), timeout=30)
    assert len(firetitan_actors()) == 2

    status, body = call("DELETE", DEP)
    assert status == 200, body
    assert wait_until(lambda: firetitan_actors() == [], timeout=30), firetitan_actors()
    assert wait_until(lambda: home.worker_pids() == [], timeout=30)
