"""`provisioner: ray` without an address: the control plane starts a local Ray cluster of its own, runs
its replica there, and stopping the control plane stops the actor, the worker and the cluster."""

from __future__ import annotations

import os
import signal

import psutil
import pytest
from ray_home import ACCT, NANO, RayHome, wait_until

from firetitan.client.provision import ensure_control_plane


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


@pytest.mark.slow
def test_own_cluster_is_started_used_and_shut_down(own_cluster_home: RayHome) -> None:
    home = own_cluster_home
    ensure_control_plane()
    call = home.http()
    status, body = call("POST", f"{ACCT}/deployments?deploymentId=own", {"baseModel": NANO})
    assert status == 200, body
    dep = home.wait_for(f"{ACCT}/deployments/own", lambda d: d["state"] == "READY" and d["replicaCount"] == 1)
    daemon = home.daemon_pid()
    assert daemon is not None
    tree = psutil.Process(daemon).children(recursive=True)
    names = " ".join(" ".join(p.cmdline()) for p in tree)
    # The cluster is the daemon's own (its GCS and raylet are its descendants), and so is the replica.
    assert "gcs_server" in names and "raylet" in names, names[:2000]
    assert dep["replicas"][0]["pid"] in [p.pid for p in tree]
    log_text = (home.layout.logs / "control_plane.log").read_text()
    started = next(line for line in log_text.splitlines() if "ray_connected" in line)
    assert "local (started here)" in started
    print(f"\n{started}")

    os.kill(daemon, signal.SIGTERM)  # the daemon's normal shutdown (the SDK's embedded daemon idles out the same way)
    assert wait_until(lambda: not any(_alive(p) for p in tree),
                      timeout=60), [p.pid for p in tree if _alive(p)]
    assert home.worker_pids() == []
