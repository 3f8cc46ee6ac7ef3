"""Fixtures: a real control-plane process on loopback with its own state directory."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

from firetitan.server.process import WorkerProcess, spawn_worker

CP_MODULE = "firetitan.server.control_plane"


@dataclass
class ControlPlaneProc:
    home: Path
    worker: WorkerProcess
    args: list[str]

    @property
    def url(self) -> str:
        return self.worker.url

    @property
    def api_key(self) -> str:
        return (self.home / "api_key").read_text().strip()

    def call(self, method: str, path: str, body: Any = None, *, key: str | None = "default",
             timeout: float = 60.0) -> tuple[int, Any]:
        """One HTTP request; returns (status, decoded JSON body)."""
        headers = {"Content-Type": "application/json"}
        if key == "default":
            key = self.api_key
        if key:
            headers["Authorization"] = f"Bearer {key}"
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                raw = resp.read()
                return resp.status, json.loads(raw) if raw else None
        except urllib.error.HTTPError as err:
            raw = err.read()
            return err.code, json.loads(raw) if raw else None

    def ok(self, method: str, path: str, body: Any = None) -> Any:
        status, payload = self.call(method, path, body)
        assert status == 200, (status, payload)
        return payload

    def wait_for(self, path: str, predicate: Any, timeout: float = 240.0) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            payload = self.ok("GET", path)
            if predicate(payload):
                return payload
            assert time.monotonic() < deadline, f"timed out waiting on {path}: {payload}"
            time.sleep(0.2)

    def worker_pids(self) -> list[int]:
        """Trainer and deployment worker processes started by this control plane."""
        try:
            children = psutil.Process(self.worker.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        return [p.pid for p in children if _is_worker(p)]

    def stop(self) -> None:
        self.worker.stop(timeout=20)


def _is_worker(proc: psutil.Process) -> bool:
    try:
        cmd = " ".join(proc.cmdline())
        return proc.status() != psutil.STATUS_ZOMBIE and (
            "firetitan.server.trainer" in cmd or "firetitan.server.deployment" in cmd)
    except psutil.Error:
        return False


def start_control_plane(home: Path, *extra: str) -> ControlPlaneProc:
    args = ["--home", str(home), "--trainer-threads", "1", "--replica-threads", "1",
            "--health-interval", "0.5", *extra]
    worker = spawn_worker(CP_MODULE, args, ready_timeout=60, log_path=home / "cp-test.log")
    return ControlPlaneProc(home, worker, args)


@pytest.fixture
def control_plane(tmp_path: Path) -> Iterator[ControlPlaneProc]:
    cp = start_control_plane(tmp_path / "home")
    try:
        yield cp
    finally:
        cp.stop()


@pytest.fixture
def start_cp() -> Iterator[Any]:
    """`start_cp(home, *flags)` starts another control plane; every one is stopped at the end."""
    started: list[ControlPlaneProc] = []

    def start(home: Path, *extra: str) -> ControlPlaneProc:
        cp = start_control_plane(home, *extra)
        started.append(cp)
        return cp

    yield start
    for cp in started:
        cp.stop()
