"""Fixtures of the Ray suite: one local Ray cluster (2 CPUs, loopback only) per session, a driver of it in
this process to inspect and kill actors, and a private FIRETITAN_HOME whose control plane uses that cluster."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# Loopback only (Ray otherwise binds and dials the host's routable address) and no usage reports over the
# network; every driver (this process, the control plane) authenticates with the cluster's token
# (~/.ray/auth_token), as a real cluster started with token auth needs. Ray reads the first when it is imported: set before any import of it, here and in every process
# the tests start (they inherit this environment).
RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token"}
os.environ.update(RAY_ENV)
ray = pytest.importorskip("ray")

from home_helpers import private_home  # noqa: E402  (after the importorskip above)
from ray_home import RayHome, firetitan_actors  # noqa: E402

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[dict[str, object]]:
    """{"address", "seconds"}: a cluster started by a helper process, shut down after the session."""
    proc = subprocess.Popen([sys.executable, str(HERE / "ray_cluster.py")], env={**os.environ, **RAY_ENV},
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdin is not None
    line = proc.stdout.readline()
    assert line, "the Ray cluster helper exited before printing its address"
    info = json.loads(line)
    print(f"\nlocal Ray cluster up in {info['seconds']:.1f}s at {info['address']}")
    ray.init(address=info["address"], namespace="firetitan-tests", log_to_driver=False)
    try:
        yield info
    finally:
        ray.shutdown()
        proc.stdin.close()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ray_cluster: dict[str, object]) -> Iterator[RayHome]:
    """A home whose daemon runs workers as actors on the session's cluster; nothing of it remains after."""
    monkeypatch.setenv("FIRETITAN_PROVISIONER", "ray")
    monkeypatch.setenv("FIRETITAN_RAY_ADDRESS", str(ray_cluster["address"]))
    for key, value in RAY_ENV.items():
        monkeypatch.setenv(key, value)
    h = RayHome(tmp_path / "ft-home")
    with private_home(h, monkeypatch):
        yield h
    assert h.control_plane_pids() == [] and h.worker_pids() == []
    assert firetitan_actors() == []


@pytest.fixture
def own_cluster_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[RayHome]:
    """A home whose daemon starts a Ray cluster of its own (no --ray-address)."""
    monkeypatch.setenv("FIRETITAN_PROVISIONER", "ray")
    monkeypatch.delenv("FIRETITAN_RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    h = RayHome(tmp_path / "ft-home")
    with private_home(h, monkeypatch):
        yield h
    assert h.control_plane_pids() == [] and h.worker_pids() == []
