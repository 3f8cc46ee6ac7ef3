"""Liveness off the request loop: a small health listener in its own thread, judged by the loop's heartbeat.

Every server's main event loop accepts, parses and answers every API request; a flood of them queues
seconds of loop work ahead of a `/health` on that loop, and a supervisor would then stop a worker that is
only busy. So `serve_app` also runs this listener, on its own event loop in its own thread and its own
port (published as `health_url` in the ready file), and the supervisor asks it instead.

A thread that answers while the main loop is wedged for good would hide a hung worker, so the main loop
bumps a heartbeat every HEARTBEAT_S and the listener answers 200 while the heartbeat is younger than
`max_lag_s` ($FIRETITAN_HEALTH_MAX_LAG_S, default DEFAULT_MAX_LAG_S), and 503 beyond: a flood (seconds
of lag) stays healthy, a hung loop is reported. Keyless answers say only the status; with the key (same
rule as the main port's auth middleware) the body adds the lag, the pid and the worker's `detail()`
(deployment id, job models...), which is called on this thread and must only read plain attributes.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from firetitan.errors import ConfigError

HEALTH_LAG_ENV = "FIRETITAN_HEALTH_MAX_LAG_S"
DEFAULT_MAX_LAG_S = 30.0
HEARTBEAT_S = 0.5
HEALTH_PATHS = ("/health", "/healthz", "/api/v1/healthz")
# Set by an application to add its detailed health body (read on the health thread, never torch).
HEALTH_DETAIL = web.AppKey("health_detail", Callable[[], dict[str, Any]])
_START_TIMEOUT_S = 30.0


def max_lag_from_env() -> float:
    raw = os.environ.get(HEALTH_LAG_ENV)
    if not raw:
        return DEFAULT_MAX_LAG_S
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"${HEALTH_LAG_ENV}={raw!r} is not a number of seconds", field=HEALTH_LAG_ENV) from None
    if not value > 0:
        raise ConfigError(f"${HEALTH_LAG_ENV} must be a positive number of seconds, got {raw!r}",
                          field=HEALTH_LAG_ENV)
    return value


class HealthListener:
    """The health port of one server: `start()` binds it (in its thread), `heartbeat()` runs on the main loop."""

    def __init__(self, host: str, api_key: str | None, *, detail: Callable[[], dict[str, Any]] | None = None,
                 max_lag_s: float | None = None) -> None:
        self.host = host
        self.api_key = api_key
        self.detail = detail
        self.max_lag_s = max_lag_from_env() if max_lag_s is None else max_lag_s
        self.last_beat = time.monotonic()
        self.url: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self._stopping: asyncio.Event | None = None  # made on the listener's own loop

    def lag(self) -> float:
        """Seconds since the main loop last ran its heartbeat."""
        return max(0.0, time.monotonic() - self.last_beat)

    async def heartbeat(self) -> None:
        """Run on the main loop until cancelled: each beat proves the loop still runs its tasks."""
        while True:
            self.last_beat = time.monotonic()
            await asyncio.sleep(HEARTBEAT_S)

    def start(self) -> str:
        """Bind a free port on `host` from a new thread; returns the listener's URL."""
        bound: dict[str, Any] = {}
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(bound, ready), name="firetitan-health",
                                        daemon=True)  # never holds the process open
        self._thread.start()
        if not ready.wait(_START_TIMEOUT_S) or "error" in bound:
            raise bound.get("error") or RuntimeError("the health listener did not start")
        self.url = str(bound["url"])
        return self.url

    def stop(self) -> None:
        loop, thread, stopping = self._loop, self._thread, self._stopping
        if loop is None or thread is None or stopping is None:
            return
        with contextlib.suppress(RuntimeError):  # its loop already closed
            loop.call_soon_threadsafe(stopping.set)
        thread.join(timeout=5.0)

    def _run(self, bound: dict[str, Any], ready: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve(bound, ready))
        except BaseException as exc:  # reported to start(); the thread must not die silently
            bound["error"] = exc
            ready.set()
        finally:
            loop.close()

    async def _serve(self, bound: dict[str, Any], ready: threading.Event) -> None:
        stopping = self._stopping = asyncio.Event()
        app = web.Application()
        for path in HEALTH_PATHS:
            app.router.add_get(path, self._health)
        runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.host, 0)
            await site.start()
            sockets = getattr(site._server, "sockets", None) or []
            port = sockets[0].getsockname()[1]
            url_host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
            bound["url"] = f"http://{url_host}:{port}"
            ready.set()
            await stopping.wait()
        finally:
            await runner.cleanup()

    async def _health(self, request: web.Request) -> web.Response:
        from firetitan.server.common import authenticated

        lag = self.lag()
        alive = lag <= self.max_lag_s
        status = 200 if alive else 503
        body: dict[str, Any] = {"status": "ok" if alive else "stalled"}
        if self.api_key and not authenticated(request, self.api_key):
            return web.json_response(body, status=status)
        extra: dict[str, Any] = {}
        if self.detail is not None:
            try:
                extra = dict(self.detail())
            except Exception as exc:  # e.g. a dict resized by the main thread mid-read: say so, stay up
                extra = {"detail_error": type(exc).__name__}
        extra.pop("status", None)
        # Rounded *up* to the millisecond: a lag just past the bound must not read as equal to it.
        body.update(extra, pid=os.getpid(), loop_lag_s=math.ceil(lag * 1000) / 1000, max_lag_s=self.max_lag_s)
        return web.json_response(body, status=status)
