"""Find this state directory's control plane, or start it as a detached daemon (one per directory)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path

from firetitan.errors import APITimeoutError, ConfigError
from firetitan.logging import get_logger
from firetitan.server.control_plane.home import (
    HomeLayout,
    read_api_key,
    resolve_home,
    running_control_plane,
)
from firetitan.server.process import spawn_worker

log = get_logger("firetitan.client.provision")
CONTROL_PLANE_MODULE = "firetitan.server.control_plane"


@contextlib.contextmanager
def _exclusive(path: Path, timeout: float) -> Iterator[None]:
    """An flock on `path`: two clients starting at once serialise here, so only one daemon starts."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise APITimeoutError(f"waited {timeout:.0f}s for {path}, held by another client") from None
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_control_plane(home: str | os.PathLike[str] | None = None, *,
                         timeout: float = 120.0) -> tuple[str, str]:
    """(url, api_key) of the live control plane for `home`, starting a daemon on loopback if none runs."""
    layout: HomeLayout = resolve_home(home).ensure()
    with _exclusive(layout.lock_file, timeout):
        url = running_control_plane(layout)
        if url is None:
            log.info("starting_control_plane", home=str(layout.root))
            worker = spawn_worker(CONTROL_PLANE_MODULE, ["--home", str(layout.root)], detach=True,
                                  ready_timeout=timeout, log_path=layout.logs / "control_plane.log")
            url = worker.url  # the daemon outlives this process by design: it is never stopped here
        key = read_api_key(layout)
    if key is None:
        raise ConfigError(f"the control plane for {layout.root} runs without a readable API key file "
                          f"({layout.api_key_file}); pass api_key=", field="api_key")
    return url, key
