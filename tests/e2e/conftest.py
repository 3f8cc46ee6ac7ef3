"""Fixtures for end-to-end runs: a private FIRETITAN_HOME whose daemon is killed afterwards."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from process_scan import live_pids

from firetitan.server.control_plane.home import HomeLayout, read_api_key, read_discovery
from firetitan.server.process import pid_alive, stop_pid


class Home:
    """A state directory plus ways to look at what its daemon runs."""

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
        """Trainer / deployment processes whose store is this home (wherever their parent is)."""
        return live_pids(lambda cmd: ("firetitan.server.trainer" in cmd or "firetitan.server.deployment" in cmd)
                         and f"{self.root}/store" in cmd)

    def http(self) -> Any:
        """A blocking (status, json) caller against the daemon, with the home's API key."""
        import json
        import urllib.error
        import urllib.request

        info = read_discovery(self.layout)
        assert info is not None, "no control plane is running"
        key = read_api_key(self.layout)

        def call(method: str, path: str, body: Any = None) -> tuple[int, Any]:
            req = urllib.request.Request(info["url"] + path, method=method,
                                         data=None if body is None else json.dumps(body).encode(),
                                         headers={"Authorization": f"Bearer {key}",
                                                  "Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=60) as resp:
                    raw = resp.read()
                    return resp.status, json.loads(raw) if raw else None
            except urllib.error.HTTPError as err:
                raw = err.read()
                return err.code, json.loads(raw) if raw else None

        return call

    def kill_daemon(self) -> None:
        for pid in self.control_plane_pids():
            stop_pid(pid, timeout=20)
        for pid in self.worker_pids():  # only if a daemon was SIGKILLed and its watchdogs lag
            stop_pid(pid, timeout=10)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Home]:
    h = Home(tmp_path / "ft-home")
    for key, value in h.env.items():
        if key.startswith(("FIRETITAN_", "HF_", "TOKENIZERS_")):
            monkeypatch.setenv(key, value)
    try:
        yield h
    finally:
        h.kill_daemon()

