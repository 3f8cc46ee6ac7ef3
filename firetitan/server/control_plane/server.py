"""Run one control plane for a state directory: single-instance lock, API key, discovery file."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import ipaddress
import os
from pathlib import Path

from aiohttp import web

from firetitan.errors import ConfigError
from firetitan.logging import get_logger
from firetitan.server.common import serve_app
from firetitan.server.control_plane.app import build_app
from firetitan.server.control_plane.controller import ControlPlane, Settings
from firetitan.server.control_plane.home import (
    HomeLayout,
    load_or_create_api_key,
    remove_discovery,
    write_discovery,
)

log = get_logger("firetitan.control_plane")
API_KEY_ENV = "FIRETITAN_API_KEY"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


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


@contextlib.contextmanager
def instance_lock(layout: HomeLayout):  # type: ignore[no-untyped-def]
    """Held for the server's lifetime, so one state directory never has two control planes."""
    layout.root.mkdir(parents=True, exist_ok=True)
    fh = open(layout.root / "control_plane.pid.lock", "a+")
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"a control plane is already running for {layout.root}; see "
                              f"{layout.discovery_file}", field="home") from None
        yield
    finally:
        fh.close()


async def run_server(layout: HomeLayout, settings: Settings, *, host: str, port: int, api_key: str,
                     ready_file: Path | None = None) -> None:
    """Serve until SIGTERM/SIGINT; then stop every worker and withdraw the discovery file."""
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
            log.info("control_plane_ready", url=app["url"], home=str(layout.root))

        async def start_publisher(app: web.Application) -> None:
            publisher.append(asyncio.create_task(publish(app)))

        async def stop_publisher(app: web.Application) -> None:
            for task in publisher:
                task.cancel()
            remove_discovery(layout, os.getpid())

        app.on_startup.append(start_publisher)
        app.on_cleanup.insert(0, stop_publisher)
        await serve_app(app, host, port, ready_file)
