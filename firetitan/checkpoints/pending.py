"""Pending-snapshot markers: a snapshot announced (kind, base) before its durable files are written in the background.

A trainer that publishes a snapshot through shared memory returns before the files exist; it first
writes `snapshots/.pending/<identity>.json` (tiny, not fsynced) so that the chain facts a hot-load needs
(is it a delta, of which base) are known at once, and so that a reader on the file path waits for the
files instead of answering "no such snapshot". The marker goes once the snapshot is published, or
when its write fails (the trainer then reports the failure on its next save and in its status).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any

from firetitan.checkpoints.shm import host_id, pid_alive
from firetitan.errors import FiretitanError
from firetitan.names import check_name

PENDING_DIR = ".pending"
WAIT_ENV = "FIRETITAN_SNAPSHOT_PENDING_WAIT_S"
_WAIT_S = 120.0  # how long a file-path reader waits for a pending snapshot's files
_POLL_S = 0.02


def _path(snapshots_dir: Path, identity: str) -> Path:
    # The name rule keeps the identity one path component (no "/", no leading "."), so this stays inside.
    return snapshots_dir / PENDING_DIR / f"{check_name(identity, field='identity')}.json"


def mark(snapshots_dir: Path, identity: str, kind: str, previous: str | None) -> None:
    directory = snapshots_dir / PENDING_DIR
    directory.mkdir(exist_ok=True)
    body = {"identity": identity, "kind": kind, "previous_snapshot_identity": previous,
            "writer_pid": os.getpid(), "host": host_id(), "created_at": time.time()}
    tmp = directory / f".{identity}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(body))
    os.replace(tmp, _path(snapshots_dir, identity))


def read(snapshots_dir: Path, identity: str) -> dict[str, Any] | None:
    try:
        return json.loads(_path(snapshots_dir, identity).read_text())
    except (FileNotFoundError, ValueError, FiretitanError):
        return None


def clear(snapshots_dir: Path, identity: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        _path(snapshots_dir, identity).unlink()


def _orphaned(marker: dict[str, Any]) -> bool:
    """A marker whose writer ran on this host and no longer runs: its files will never come."""
    return marker.get("host") == host_id() and not pid_alive(int(marker.get("writer_pid", 0)))


def clear_if_orphaned(snapshots_dir: Path, identity: str) -> None:
    """Remove `identity`'s marker if its writer died. The writer publishes the files, then removes the
    marker, so one killed between the two leaves a marker beside published files, which no wait clears."""
    marker = read(snapshots_dir, identity)
    if marker is not None and _orphaned(marker):
        clear(snapshots_dir, identity)


def sweep_dead(snapshots_dir: Path) -> None:
    """Remove the markers of writers on this host that died before their files were written."""
    with contextlib.suppress(FileNotFoundError):
        for entry in (snapshots_dir / PENDING_DIR).iterdir():
            with contextlib.suppress(FileNotFoundError, ValueError):
                if entry.suffix == ".json" and _orphaned(json.loads(entry.read_text())):
                    entry.unlink()


def wait_published(snapshots_dir: Path, identity: str, published: Any, timeout_s: float | None = None) -> None:
    """While `identity` is pending, wait (bounded) until `published()` is true or the marker goes (or
    its writer, on this host, is found dead: then the marker goes too)."""
    deadline = time.monotonic() + (float(os.environ.get(WAIT_ENV, _WAIT_S)) if timeout_s is None else timeout_s)
    while (marker := read(snapshots_dir, identity)) is not None and not published():
        if _orphaned(marker):
            clear(snapshots_dir, identity)
            return
        if time.monotonic() >= deadline:
            return
        time.sleep(_POLL_S)
