"""The Ray suite's home: tests/home_helpers.Home plus waiting on its resources, and the provisioner's actors."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import ray
from home_helpers import Home, wait_until

NAMESPACE = "firetitan"  # firetitan.server.control_plane.ray_provisioner.NAMESPACE
ACCT = "/v1/accounts/local"
NANO = "firetitan/nano-qwen3"


class RayHome(Home):
    def wait_for(self, path: str, predicate: Callable[[Any], bool], timeout: float = 180.0) -> Any:
        return super().wait_for(path, predicate, timeout)  # Ray actors start slower than processes


def firetitan_actors() -> list[str]:
    """Names of the live actors a control plane's Ray provisioner created (any home)."""
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == NAMESPACE)


__all__ = ["ACCT", "NAMESPACE", "NANO", "RayHome", "firetitan_actors", "wait_until"]
