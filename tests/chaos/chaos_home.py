"""Shared helpers of the chaos suite: the home (tests/home_helpers.py) plus waiting on its resources."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from home_helpers import Home

NANO = "firetitan/nano-qwen3"
ACCT = "/v1/accounts/local"


class ChaosHome(Home):
    """`Home` plus waiting on the daemon's resources."""

    def wait_for(self, path: str, predicate: Callable[[Any], bool], timeout: float = 120.0) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            status, payload = self.http()("GET", path)
            assert status == 200, (status, payload)
            if predicate(payload):
                return payload
            assert time.monotonic() < deadline, f"timed out waiting on {path}: {payload}"
            time.sleep(0.1)


def wait_until(predicate: Callable[[], bool], timeout: float, step: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(step)
    return True
