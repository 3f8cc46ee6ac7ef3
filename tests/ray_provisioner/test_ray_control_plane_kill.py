"""`provisioner: ray`: a control plane killed with SIGKILL leaves no actor and no worker behind: its
actors are owned by its Ray driver, and each worker stops when its actor does."""

from __future__ import annotations

import os
import signal

import pytest
from ray_home import ACCT, NANO, RayHome, firetitan_actors, wait_until

from firetitan.client.provision import ensure_control_plane
from firetitan.server.process import pid_alive


@pytest.mark.slow
def test_sigkill_of_the_control_plane_ends_its_actors_and_workers(home: RayHome) -> None:
    ensure_control_plane()
    call = home.http()
    status, body = call("POST", f"{ACCT}/deployments?deploymentId=orphan", {"baseModel": NANO})
    assert status == 200, body
    dep = home.wait_for(f"{ACCT}/deployments/orphan", lambda d: d["state"] == "READY" and d["replicaCount"] == 1)
    worker = dep["replicas"][0]["pid"]
    assert len(firetitan_actors()) == 1
    daemon = home.daemon_pid()
    assert daemon is not None

    os.kill(daemon, signal.SIGKILL)  # no cleanup code of the control plane runs

    assert wait_until(lambda: firetitan_actors() == [], timeout=60), firetitan_actors()
    assert wait_until(lambda: not pid_alive(worker), timeout=30)
    assert home.worker_pids() == []
