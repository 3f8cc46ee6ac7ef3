"""Find this state directory's control plane, or start it as a detached daemon (one per directory)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path

from firetitan.errors import APITimeoutError, ConfigError, WorkerCrashedError
from firetitan.home import (
    HomeLayout,
    control_plane_lock_held,
    flock_exclusive,
    read_api_key,
    resolve_home,
    running_control_plane,
)
from firetitan.logging import get_logger
from firetitan.process import spawn_worker

log = get_logger("firetitan.client.provision")
CONTROL_PLANE_MODULE = "firetitan.server.control_plane"


@contextlib.contextmanager
def _exclusive(path: Path, timeout: float) -> Iterator[None]:
    """An flock on `path`: two clients starting at once serialise here, so only one daemon starts."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        if not flock_exclusive(fh, timeout):
            raise APITimeoutError(f"waited {timeout:.0f}s for {path}, held by another client")
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


DAEMON_IDLE_EXIT_ENV = "FIRETITAN_DAEMON_IDLE_EXIT"


def daemon_idle_exit() -> float:
    """Seconds the embedded daemon waits with no workers and no requests before it exits (0 = never)."""
    return float(os.environ.get(DAEMON_IDLE_EXIT_ENV, "900"))


def ensure_control_plane(home: str | os.PathLike[str] | None = None, *,
                         timeout: float = 120.0) -> tuple[str, str]:
    """(url, api_key) of the live control plane for `home`, starting a daemon on loopback if none runs.

    Any number of clients may call this at once: they take turns under the client lock, the first
    starts the daemon and waits until it is discoverable, the others find it.
    """
    layout: HomeLayout = resolve_home(home).ensure()
    deadline = time.monotonic() + timeout
    with _exclusive(layout.lock_file, timeout):
        url = _find_or_start(layout, deadline)
    key = read_api_key(layout)
    if key is None:
        raise ConfigError(f"the control plane for {layout.root} runs without a readable API key file "
                          f"({layout.api_key_file}); pass api_key=", field="api_key")
    return url, key


def _find_or_start(layout: HomeLayout, deadline: float) -> str:
    """Connect to the directory's control plane; start one only when none holds its instance lock.

    The instance lock, not the discovery file, decides: a daemon that is still starting, is busy
    (a slow /health), or is stopping holds it but may not be discoverable. Such a daemon is waited
    for (or out), since a second one would only find the lock taken and exit.
    """
    while True:
        remaining = deadline - time.monotonic()
        url = running_control_plane(layout, timeout=max(0.5, min(5.0, remaining)))
        if url is not None:
            return url
        if not control_plane_lock_held(layout):
            log.info("starting_control_plane", home=str(layout.root))
            try:
                worker = spawn_worker(CONTROL_PLANE_MODULE,
                                      ["--home", str(layout.root), "--exit-when-idle", str(daemon_idle_exit())],
                                      detach=True,
                                      ready_timeout=max(1.0, remaining),
                                      log_path=layout.logs / "control_plane.log")
            except WorkerCrashedError:
                # A server started outside this SDK (`firetitan serve`) took the lock first: ours
                # exited with EXIT_ALREADY_RUNNING. Connect to the winner; any other crash is real.
                if not control_plane_lock_held(layout):
                    raise
                log.info("control_plane_started_elsewhere", home=str(layout.root))
            else:
                # The daemon publishes its discovery file before its ready file, so it is findable
                # by the next client as soon as this lock is released. It is never stopped here.
                return worker.url
        if time.monotonic() > deadline:
            raise APITimeoutError(f"a control plane holds the lock for {layout.root} but did not answer "
                                  f"at {layout.discovery_file} in time")
        time.sleep(0.1)
