"""Process and connection checks for the recipe tests."""

from __future__ import annotations

import json
import time
from pathlib import Path

import psutil


def worker_processes(home: Path, grace_s: float = 20.0) -> list[psutil.Process]:
    """Trainer/deployment processes started for this home still alive after `grace_s` (to be reaped)."""
    deadline = time.monotonic() + grace_s
    while True:
        alive = _workers(home)
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.5)


def _workers(home: Path) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if str(home) in cmd and "control_plane" not in cmd:
            out.append(p)
    return out


def open_worker_connections(home: Path) -> list[str]:
    """This process's established loopback TCP connections to anything but the control plane."""
    cp = json.loads((home / "control_plane.json").read_text())
    cp_port = int(cp["url"].rsplit(":", 1)[1])
    conns = psutil.Process().net_connections(kind="tcp")
    return [f"{c.raddr}" for c in conns if c.status == psutil.CONN_ESTABLISHED and c.raddr
            and c.raddr.ip == "127.0.0.1" and c.raddr.port != cp_port]
