"""Run one control plane for a state directory: single-instance lock, API key, discovery file."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from aiohttp import web

from firetitan.bind import is_loopback
from firetitan.errors import ConfigError
from firetitan.logging import get_logger
from firetitan.server.common import serve_app, write_ready_file
from firetitan.server.control_plane.app import build_app
from firetitan.server.control_plane.controller import ControlPlane, Settings
from firetitan.server.control_plane.home import (
    HomeLayout,
    flock_exclusive,
    load_or_create_api_key,
    remove_discovery,
    write_discovery,
)

log = get_logger("firetitan.control_plane")
API_KEY_ENV = "FIRETITAN_API_KEY"
# The exit status of a server that found another one already running for its state directory.
EXIT_ALREADY_RUNNING = 3


def resolve_api_key(layout: HomeLayout, host: str, explicit: str | None) -> str:
    """An explicit key (flag or $FIRETITAN_API_KEY) is required off loopback; on loopback the state
    directory's generated key is used when none is given."""
    key = explicit or os.environ.get(API_KEY_ENV)
    if key:
        return key
    if not is_loopback(host):
        raise ConfigError(f"--host {host} is reachable from other machines: pass --api-key or set "
                          f"${API_KEY_ENV}", field="api_key")
    return load_or_create_api_key(layout)


class ControlPlaneRunningError(ConfigError):
    """Another control plane holds this state directory's single-instance lock: not a failure for a
    daemon started by a client, which then connects to the winner."""

    exit_code = EXIT_ALREADY_RUNNING


@contextlib.contextmanager
def instance_lock(layout: HomeLayout, wait: float = 2.0) -> Iterator[None]:
    """Held for the server's lifetime, so one state directory never has two control planes.

    Clients probe the lock (a shared flock for an instant, see `control_plane_lock_held`), so a
    busy lock is retried for `wait` seconds before concluding that another server owns it.
    """
    layout.root.mkdir(parents=True, exist_ok=True)
    fh = open(layout.instance_lock_file, "a+")
    try:
        if not flock_exclusive(fh, wait):
            raise ControlPlaneRunningError(
                f"a control plane is already running for {layout.root}; see {layout.discovery_file}", field="home")
        yield
    finally:
        fh.close()


async def run_server(layout: HomeLayout, settings: Settings, *, host: str, port: int, api_key: str,
                     ready_file: Path | None = None) -> None:
    """Serve until SIGTERM/SIGINT; then stop every worker and withdraw the discovery file.

    The ready file is written only after the discovery file, so a client that started this daemon
    and saw it ready never hands the client lock to another client that cannot yet discover it.
    """
    with instance_lock(layout):
        cp = ControlPlane(layout, settings, api_key)
        app = build_app(cp)
        publisher: list[asyncio.Task[None]] = []

        async def publish(app: web.Application) -> None:
            # serve_app sets app["url"] once the socket is bound and offers no event for it; the
            # discovery file follows it within 10 ms.
            while "url" not in app:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
            write_discovery(layout, app["url"], os.getpid())
            if ready_file is not None:
                write_ready_file(ready_file, {"url": app["url"], "pid": os.getpid()})
            log.info("control_plane_ready", url=app["url"], home=str(layout.root))

        async def start_publisher(app: web.Application) -> None:
            publisher.append(asyncio.create_task(publish(app)))

        async def stop_publisher(app: web.Application) -> None:
            for task in publisher:
                task.cancel()
            remove_discovery(layout, os.getpid())

        app.on_startup.append(start_publisher)
        app.on_cleanup.insert(0, stop_publisher)
        await serve_app(app, host, port)
