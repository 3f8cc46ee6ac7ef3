"""The embedded daemon's idle exit: it stops itself only when it has no workers and no requests."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from firetitan.server.process import pid_alive


def _wait_exit(pid: int, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.2)
    return False


def test_idle_daemon_exits_and_cleans_discovery(tmp_path: Path, start_cp: Any) -> None:
    home = tmp_path / "home"
    cp = start_cp(home, "--exit-when-idle", "1", "--trainer-idle-timeout", "2")
    assert cp.ok("GET", "/v1/accounts/local/deployments") is not None
    assert (home / "control_plane.json").exists()
    assert _wait_exit(cp.worker.pid, within=60), "idle control plane did not exit"
    assert cp.worker.popen is not None and cp.worker.popen.wait(timeout=10) == 0
    assert not (home / "control_plane.json").exists()


def test_requests_keep_the_daemon_alive(tmp_path: Path, start_cp: Any) -> None:
    cp = start_cp(tmp_path / "home", "--exit-when-idle", "3", "--trainer-idle-timeout", "2")
    # Keep calling for longer than the idle limit: each request resets the clock.
    until = time.monotonic() + 6
    while time.monotonic() < until:
        cp.ok("GET", "/v1/accounts/local/rlorTrainerJobs")
        time.sleep(0.3)
    assert cp.worker.alive()
