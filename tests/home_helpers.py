"""A private FIRETITAN_HOME for end-to-end and chaos tests: its environment, its processes, a blocking caller."""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from process_scan import live_pids

from firetitan.server.control_plane.home import HomeLayout, read_api_key, read_discovery
from firetitan.server.process import pid_alive, stop_pid


class Home:
    """A state directory, the environment that points every client and daemon at it, and its processes."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.layout = HomeLayout(root)

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "FIRETITAN_HOME": str(self.root), "HF_HUB_OFFLINE": "1",
                "FIRETITAN_TRAINER_THREADS": "1", "FIRETITAN_REPLICA_THREADS": "1",
                "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}

    def daemon_pid(self) -> int | None:
        info = read_discovery(self.layout)
        return int(info["pid"]) if info and pid_alive(int(info["pid"])) else None

    def control_plane_pids(self) -> list[int]:
        return live_pids(lambda cmd: "firetitan.server.control_plane" in cmd and str(self.root) in cmd)

    def worker_pids(self) -> list[int]:
        """Trainer / deployment processes whose store is this home's, whoever their parent is."""
        return live_pids(lambda cmd: ("firetitan.server.trainer" in cmd or "firetitan.server.deployment" in cmd)
                         and f"{self.root}/store" in cmd)

    def http(self) -> Callable[..., tuple[int, Any]]:
        """A blocking `(method, path, body=None) -> (status, json)` caller against the running daemon."""
        info = read_discovery(self.layout)
        assert info is not None, "no control plane is running"
        key = read_api_key(self.layout)
        return lambda method, path, body=None: call(info["url"], method, path, body, key=key)

    def wait_for(self, path: str, predicate: Callable[[Any], bool], timeout: float = 120.0) -> Any:
        """GET `path` from the daemon until `predicate(body)` holds; fail after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            status, payload = self.http()("GET", path)
            assert status == 200, (status, payload)
            if predicate(payload):
                return payload
            assert time.monotonic() < deadline, f"timed out waiting on {path}: {payload}"
            time.sleep(0.1)

    def stop_everything(self) -> None:
        """Every process of this home, control planes first (they stop their workers); workers only
        remain if a daemon was SIGKILLed and their watchdogs lag."""
        for pid in self.control_plane_pids():
            stop_pid(pid, timeout=20)
        for pid in self.worker_pids():
            stop_pid(pid, timeout=10)


def wait_until(predicate: Callable[[], bool], timeout: float, step: float = 0.1) -> bool:
    """Poll `predicate` every `step` seconds; whether it held within `timeout`."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(step)
    return True


def call(url: str, method: str, path: str, body: Any = None, *, key: str | None = None,
         timeout: float = 60.0) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    req = urllib.request.Request(url + path, method=method, headers=headers,
                                 data=None if body is None else json.dumps(body).encode())
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
            return resp.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as err:
        raw = err.read()
        return err.code, json.loads(raw) if raw else None


@contextmanager
def private_home(home: Home, monkeypatch: Any) -> Iterator[Home]:
    """Point this process's FIRETITAN_* / HF_* / TOKENIZERS_* at `home`, and stop its processes after."""
    for key, value in home.env.items():
        if key.startswith(("FIRETITAN_", "HF_", "TOKENIZERS_")):
            monkeypatch.setenv(key, value)
    try:
        yield home
    finally:
        home.stop_everything()
