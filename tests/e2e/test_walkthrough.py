"""The seed walkthrough as a user runs it: the example script, Ctrl-C, and a shared daemon."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

Home = Any  # the `home` fixture (tests/e2e/conftest.py)
PYTHON = sys.executable
REPO = Path(__file__).resolve().parents[2]

EXAMPLE = str(REPO / "examples" / "training_and_sampling.py")
NANO = ["--base-model", "firetitan/nano-qwen3"]


@pytest.mark.slow
def test_example_runs_the_walkthrough_and_cleans_up(home: Home) -> None:
    proc = subprocess.run([PYTHON, EXAMPLE, *NANO, "--steps", "4", "--eval-interval", "2",
                           "--deployment-id", "walk"], env=home.env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "'trainer_job_id': 'firetitan-" in out and "'deployment_id': 'walk'" in out
    assert out.count("'eval_score':") == 3  # steps 0, 2 and 4
    assert "summary" in out
    # cleanup_trainer_on_close=True and "scale_to_zero": no worker left, the deployment kept at zero.
    assert home.worker_pids() == []
    call = home.http()
    status, dep = call("GET", "/v1/accounts/local/deployments/walk")
    assert status == 200 and dep["maxReplicaCount"] == 0 and dep["replicaCount"] == 0
    jobs = call("GET", "/v1/accounts/local/rlorTrainerJobs")[1]["rlorTrainerJobs"]
    assert [j["state"] for j in jobs] == ["JOB_STATE_DELETED"]


@pytest.mark.slow
def test_ctrl_c_during_the_example_leaves_no_worker(home: Home) -> None:
    proc = subprocess.Popen([PYTHON, EXAMPLE, *NANO, "--steps", "100000", "--eval-interval", "1000",
                             "--deployment-id", "interrupted"], env=home.env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout is not None
        seen = []
        for line in proc.stdout:  # the first eval line means training is under way
            seen.append(line)
            if "'eval_score'" in line:
                break
        assert any("'eval_score'" in line for line in seen), "".join(seen)[-3000:]
        assert home.worker_pids(), "the trainer and deployment should be running"
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert home.worker_pids() == [], rest[-3000:]
    assert home.daemon_pid() is not None  # the daemon itself stays for the next run


def test_two_clients_starting_at_once_share_one_control_plane(home: Home) -> None:
    code = ("from firetitan.client.provision import ensure_control_plane; "
            "url, key = ensure_control_plane(); print(url, len(key))")
    procs = [subprocess.Popen([PYTHON, "-c", code], env=home.env, stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=180)[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert outs[0][0] == outs[1][0]
    assert len(home.control_plane_pids()) == 1
    assert home.daemon_pid() == home.control_plane_pids()[0]
    # Every request without the generated key is rejected.
    import urllib.error
    import urllib.request

    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(outs[0][0] + "/v1/accounts/local/deployments", timeout=30)
    assert err.value.code == 401
