"""The Ray suite's home: tests/home_helpers.Home plus waiting on its resources, and the provisioner's actors."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import ray
from home_helpers import Home

NAMESPACE = "firetitan"  # firetitan.server.control_plane.ray_provisioner.NAMESPACE
ACCT = "/v1/accounts/local"
NANO = "firetitan/nano-qwen3"


class RayHome(Home):
    def wait_for(self, path: str, predicate: Callable[[Any], bool], timeout: float = 180.0) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            status, payload = self.http()("GET", path)
            assert status == 200, (status, payload)
            if predicate(payload):
                return payload
            assert time.monotonic() < deadline, f"timed out waiting on {path}: {payload}"
            time.sleep(0.2)


def firetitan_actors() -> list[str]:
    """Names of the live actors a control plane's Ray provisioner created (any home)."""
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == NAMESPACE)


def wait_until(predicate: Callable[[], bool], timeout: float, step: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(step)
    return True
