"""aiohttp plumbing shared by every firetitan service: errors, auth, bodies, serving."""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import os
import signal
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pydantic
from aiohttp import web

from firetitan.errors import FiretitanError, InvalidRequestError

M = TypeVar("M", bound=pydantic.BaseModel)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Paths any caller may hit without a key: liveness probes of supervisors and load balancers.
_OPEN_PATHS = ("/health", "/healthz", "/api/v1/healthz")


def error_json(status: int, message: str, *, field: str | None = None, type_name: str = "Error") -> web.Response:
    body = {"error": {"type": type_name, "message": message, "field": field}}
    return web.json_response(body, status=status)


def _validation_field(err: pydantic.ValidationError) -> tuple[str | None, str]:
    first = err.errors()[0] if err.errors() else None
    if first is None:
        return None, str(err)
    field = ".".join(str(p) for p in first.get("loc", ())) or None
    return field, f"{field or 'body'}: {first.get('msg')} (got {str(first.get('input'))[:200]!r})"


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn every failure into a JSON error body; a bad request never takes the worker down."""
    from firetitan.logging import get_logger

    try:
        return await handler(request)
    except web.HTTPException:
        raise
    except FiretitanError as exc:
        return web.json_response(exc.to_body(), status=exc.status_code)
    except pydantic.ValidationError as exc:
        field, message = _validation_field(exc)
        return error_json(400, message, field=field, type_name="InvalidRequestError")
    except (asyncio.CancelledError, KeyboardInterrupt):
        raise
    except Exception as exc:  # a bug in a handler must not kill the worker
        get_logger("firetitan.server").exception("unhandled_error", path=request.path)
        return error_json(500, f"internal error: {type(exc).__name__}: {exc}", type_name="InternalError")


def auth_middleware(api_key: str | None) -> Callable[..., Awaitable[web.StreamResponse]]:
    """Require `Authorization: Bearer KEY` (or `x-api-key`) on every non-health route."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if api_key and request.path not in _OPEN_PATHS:
            given = request.headers.get("x-api-key") or ""
            auth = request.headers.get("Authorization", "")
            if auth.lower().startswith("bearer "):
                given = auth[7:].strip()
            if not hmac.compare_digest(given.encode(), api_key.encode()):
                return error_json(401, "missing or invalid API key", field="Authorization",
                                  type_name="AuthenticationError")
        return await handler(request)

    return middleware


async def parse_body(request: web.Request, model: type[M]) -> M:
    """Read a JSON body into `model`; malformed JSON or fields raise a 400 naming the field."""
    try:
        raw = await request.json(loads=json.loads)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidRequestError(f"request body is not valid JSON: {exc}", field="body") from exc
    if not isinstance(raw, dict):
        raise InvalidRequestError("request body must be a JSON object", field="body")
    return model.model_validate(raw)


def json_response(value: pydantic.BaseModel | dict[str, Any] | list[Any], status: int = 200) -> web.Response:
    if isinstance(value, pydantic.BaseModel):
        return web.Response(text=value.model_dump_json(), status=status, content_type="application/json")
    return web.json_response(value, status=status)


def make_app(api_key: str | None = None, *, client_max_size: int = 256 * 1024 * 1024) -> web.Application:
    """An application with the standard middlewares (errors outermost, then auth)."""
    return web.Application(middlewares=[error_middleware, auth_middleware(api_key)],
                           client_max_size=client_max_size)


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """The flags every worker takes (see docs/contracts.md)."""
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--ready-file", type=Path, default=None)
    parser.add_argument("--api-key", default=os.environ.get("FIRETITAN_WORKER_API_KEY"))
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--log-level", default=None)


def write_ready_file(path: Path, payload: dict[str, Any]) -> None:
    """Atomically publish where a worker listens, so a parent never reads a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".ready-")
    with os.fdopen(fd, "w") as fh:
        json.dump(payload, fh)
    os.replace(tmp, path)


async def serve_app(app: web.Application, host: str, port: int, ready_file: Path | None = None,
                    *, extra_ready: dict[str, Any] | None = None) -> None:
    """Serve until SIGTERM/SIGINT, then run the app's cleanup hooks and return."""
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=5.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    server = site._server
    sockets = getattr(server, "sockets", None) or []
    bound_port = sockets[0].getsockname()[1] if sockets else port
    url_host = "127.0.0.1" if host in ("0.0.0.0", "") else host
    url = f"http://{url_host}:{bound_port}"
    app["url"] = url
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if ready_file is not None:
        write_ready_file(ready_file, {"url": url, "pid": os.getpid(), **(extra_ready or {})})
    from firetitan.logging import get_logger

    get_logger("firetitan.server").info("listening", url=url)
    watchdog = asyncio.create_task(_watch_parent(stop))
    try:
        await stop.wait()
    finally:
        watchdog.cancel()
        await runner.cleanup()


async def _watch_parent(stop: asyncio.Event) -> None:
    """Stop when the process that started us is gone, so a killed parent leaves no orphan worker.
    A control plane's workers get a grace period (`$FIRETITAN_PARENT_GRACE_S`): if a new control plane
    publishes itself in `$FIRETITAN_ADOPTER_FILE` within it, that one becomes the parent to watch."""
    from firetitan.server.process import ADOPTER_FILE_ENV, PARENT_GRACE_ENV, PARENT_PID_ENV, pid_alive

    raw = os.environ.get(PARENT_PID_ENV)
    if not raw:
        return
    parent = first = int(raw)
    grace = float(os.environ.get(PARENT_GRACE_ENV) or 0)
    adopter_file = os.environ.get(ADOPTER_FILE_ENV)
    while not stop.is_set():
        if not pid_alive(parent) or (parent == first and os.getppid() != first):
            adopter = await _await_adopter(adopter_file, parent, grace) if adopter_file and grace > 0 else None
            if adopter is None:
                stop.set()
                return
            parent = adopter
        await asyncio.sleep(1.0)


async def _await_adopter(path: str, gone: int, grace: float) -> int | None:
    """The pid of a live control plane (not the one that is gone) named in `path` within `grace` s."""
    from firetitan.server.process import pid_alive

    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            pid = int(json.loads(await asyncio.to_thread(Path(path).read_text))["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            pid = None
        if pid is not None and pid != gone and pid_alive(pid):
            return pid
        await asyncio.sleep(0.5)
    return None
