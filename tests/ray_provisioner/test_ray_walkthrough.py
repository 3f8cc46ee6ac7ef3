"""The seed walkthrough (examples/training_and_sampling.py) with `provisioner: ray`: the trainer and the
replica run as actors on a local Ray cluster, and nothing of them is left when the example closes."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from ray_home import ACCT, NANO, RayHome, firetitan_actors

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = str(REPO / "examples" / "training_and_sampling.py")


@pytest.mark.slow
def test_walkthrough_on_ray_trains_samples_and_leaves_no_actor(home: RayHome) -> None:
    proc = subprocess.Popen([sys.executable, EXAMPLE, "--base-model", NANO, "--steps", "4", "--eval-interval", "2",
                             "--deployment-id", "walk"], env=home.env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    seen: set[str] = set()
    try:
        deadline = time.monotonic() + 600
        while proc.poll() is None and time.monotonic() < deadline:
            if home.daemon_pid() is not None:
                seen.update(firetitan_actors())  # what runs, sampled while the example does
            time.sleep(0.5)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-4000:]
    assert "'deployment_id': 'walk'" in out and out.count("'eval_score':") == 3 and "summary" in out, out[-3000:]
    # Both kinds of worker ran as actors of this cluster.
    assert any(":trainer:local/" in name for name in seen), seen
    assert any(":replica:local/walk/replica-0" in name for name in seen), seen
    # cleanup_trainer_on_close=True and "scale_to_zero": no actor and no worker process left.
    assert firetitan_actors() == []
    assert home.worker_pids() == []
    call = home.http()
    status, dep = call("GET", f"{ACCT}/deployments/walk")
    assert status == 200 and dep["replicaCount"] == 0
    jobs = call("GET", f"{ACCT}/rlorTrainerJobs")[1]["rlorTrainerJobs"]
    assert [j["state"] for j in jobs] == ["JOB_STATE_DELETED"]
