"""aiohttp plumbing shared by every firetitan service: errors, auth, bodies, serving."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import hmac
import json
import math
import os
import signal
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pydantic
from aiohttp import web

from firetitan.bind import require_key_off_loopback
from firetitan.errors import (
    ConfigError,
    FiretitanError,
    InternalServerError,
    InvalidRequestError,
    PayloadTooLargeError,
    UnsupportedMediaTypeError,
)
from firetitan.home import key_spellings
from firetitan.names import check_name

M = TypeVar("M", bound=pydantic.BaseModel)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Paths any caller may hit without a key: liveness probes of supervisors and load balancers.
_OPEN_PATHS = ("/health", "/healthz", "/api/v1/healthz")
API_KEY = web.AppKey("api_key", str)
_MAX_BODY = web.AppKey("max_body_bytes", int)

# Request bounds (docs/security-and-limits.md). The body limit is per application (`make_app`'s
# `max_body_bytes`), overridable for every service by $FIRETITAN_MAX_BODY_BYTES.
MAX_BODY_ENV = "FIRETITAN_MAX_BODY_BYTES"
DEFAULT_MAX_BODY_BYTES = 256 * 1024 * 1024  # trainer batches of many long datums; the tightest callers pass less
MAX_JSON_DEPTH = 64
MAX_JSON_INT = 2**63 - 1  # what every numeric field fits in (int64 tensors, seeds, step counters)
# Path parameters that name things: checked by the name rule before any handler sees them.
_NAME_PARAMS = {"account": "account", "rid": "id", "identity": "identity", "shape": "trainingShape",
                "version": "version"}
# Media types accepted as JSON; a request with no type (or aiohttp's default octet-stream) is read as JSON.
_UNTYPED = ("", "application/octet-stream")


def error_json(status: int, message: str, *, field: str | None = None, type_name: str = "Error",
               headers: dict[str, str] | None = None) -> web.Response:
    body = {"error": {"type": type_name, "message": message, "field": field}}
    return web.json_response(body, status=status, headers=headers)


def _validation_field(err: pydantic.ValidationError) -> tuple[str | None, str]:
    first = err.errors()[0] if err.errors() else None
    if first is None:
        return None, str(err)
    field = ".".join(str(p) for p in first.get("loc", ())) or None
    return field, f"{field or 'body'}: {first.get('msg')} (got {_short(first.get('input'))})"


def _short(value: object, limit: int = 200) -> str:
    # repr, not str: a lone surrogate must not reach the UTF-8 encoder of the response.
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn every failure into a JSON error body; a bad request never takes the worker down.

    A 500 names an error id that the server logs with its traceback; the exception text stays in the
    log (it can hold paths, values or other callers' data), never in the answer.
    """
    try:
        return await handler(request)
    except web.HTTPRequestEntityTooLarge as exc:
        limit = request.app[_MAX_BODY] if _MAX_BODY in request.app else request.client_max_size
        err: FiretitanError = PayloadTooLargeError(
            f"request body is larger than this API accepts ({limit} bytes; ${MAX_BODY_ENV} sets the limit): "
            f"{exc.text}", field="body")
        return web.json_response(err.to_body(), status=err.status_code)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        # aiohttp's own 4xx (no such route, wrong method) as the same JSON error body as ours.
        headers = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "retry-after")}
        type_name = {404: "NotFoundError", 405: "MethodNotAllowedError", 413: "PayloadTooLargeError",
                     415: "UnsupportedMediaTypeError"}.get(exc.status, "InvalidRequestError")
        message = f"{request.method} {_short(request.path, 120)}: {exc.reason}"
        return error_json(exc.status, message, type_name=type_name, headers=headers)
    except FiretitanError as exc:
        return web.json_response(exc.to_body(), status=exc.status_code)
    except pydantic.ValidationError as exc:
        field, message = _validation_field(exc)
        return error_json(400, message, field=field, type_name="InvalidRequestError")
    except (asyncio.CancelledError, KeyboardInterrupt):
        raise
    except Exception as exc:  # a bug in a handler must not kill the worker
        err = internal_error(exc, path=request.path, method=request.method)
        return web.json_response(err.to_body(), status=500)


def internal_error(exc: BaseException, **context: Any) -> InternalServerError:
    """Log `exc` with its traceback under a fresh error id; return the error to answer with instead.

    For every place a service turns an unexpected exception into an answer (the middleware, a failed
    future): the caller sees the id, the log has the exception.
    """
    from firetitan.logging import get_logger

    error_id = uuid.uuid4().hex[:16]
    get_logger("firetitan.server").error("unhandled_error", error_id=error_id, exc_info=exc, **context)
    return InternalServerError(f"internal error {error_id}; the server log has the details under this id",
                               error_id=error_id)


def authenticated(request: web.Request, api_key: str) -> bool:
    """Whether the request carries `api_key` (Bearer or x-api-key); shared by the health listener."""
    given = request.headers.get("x-api-key") or ""
    auth = request.headers.get("Authorization", "")
    if auth.lower().startswith("bearer "):
        given = auth[7:].strip()
    # Either spelling of the same secret (tml-/fw_, see firetitan.home.key_spellings); every spelling is
    # compared, so the time taken does not say which one came close.
    matches = [hmac.compare_digest(given.encode(), key.encode()) for key in key_spellings(api_key)]
    return any(matches)


def auth_middleware(api_key: str | None) -> Callable[..., Awaitable[web.StreamResponse]]:
    """Require `Authorization: Bearer KEY` (or `x-api-key`) on every non-health route.

    Health stays open for probes, but without the key it says alive (its status) and no more: job
    ids, model names and steps are for callers holding the key.
    """

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not api_key or authenticated(request, api_key):
            return await handler(request)
        if request.path not in _OPEN_PATHS:
            return error_json(401, "missing or invalid API key", field="Authorization",
                              type_name="AuthenticationError")
        response = await handler(request)
        status = "ok"
        if isinstance(response, web.Response) and response.content_type == "application/json":
            with contextlib.suppress(ValueError, TypeError, AttributeError, KeyError):
                status = str(json.loads(response.body)["status"])  # type: ignore[arg-type]
        return web.json_response({"status": status}, status=response.status)

    return middleware


@web.middleware
async def name_params_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Check every path parameter that names something (account, id, identity) by the one name rule.

    Runs before any handler, so an account like `..%2F..%2Fescaped` is a 400 and never a path.
    """
    for key, field in _NAME_PARAMS.items():
        value = request.match_info.get(key)
        if value is not None:
            check_name(value, field=field)
    return await handler(request)


async def parse_body(request: web.Request, model: type[M]) -> M:
    """Read a JSON body into `model`; anything malformed is a 4xx naming the problem.

    415: a declared media type that is not JSON (text/plain, forms). 413: over the body limit.
    400: invalid UTF-8 or JSON, a top level that is not an object, nesting deeper than
    MAX_JSON_DEPTH, a lone surrogate, a non-finite number, an integer beyond int64, or a field the
    model refuses (named by its dotted path).
    """
    ctype = request.headers.get("Content-Type", "").split(";")[0].strip().lower()
    if ctype not in _UNTYPED and ctype != "application/json" and not ctype.endswith("+json"):
        raise UnsupportedMediaTypeError(f"Content-Type {ctype!r} is not accepted: send the body as application/json",
                                        field="Content-Type")
    raw = await request.read()
    return model.model_validate(loads_checked(raw))


def loads_checked(raw: bytes | str) -> dict[str, Any]:
    """`json.loads` for untrusted bodies: a JSON object within the bounds above, else InvalidRequestError."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    except UnicodeDecodeError as exc:
        raise InvalidRequestError(f"request body is not valid UTF-8: {exc.reason} at byte {exc.start}",
                                  field="body") from exc
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidRequestError(f"request body is not valid JSON: {exc}", field="body") from exc
    except RecursionError:
        raise InvalidRequestError(f"request body nests deeper than {MAX_JSON_DEPTH} levels", field="body") from None
    if not isinstance(value, dict):
        raise InvalidRequestError("request body must be a JSON object", field="body")
    _check_tree(value, text)
    return value


def _check_tree(root: dict[str, Any], text: str) -> None:
    """Walk the parsed body iteratively (no recursion to exhaust) and refuse what would break later."""
    # Fewer brackets than the depth limit cannot nest past it; bodies of scalars skip the depth walk.
    check_depth = text.count("[") + text.count("{") > MAX_JSON_DEPTH
    # Strict UTF-8 decoding refuses raw surrogates, so only a `\\uD8xx`-style escape can make one.
    check_text = "\\u" in text
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(root, ())]
    while stack:
        node, path = stack.pop()
        if check_depth and len(path) > MAX_JSON_DEPTH:
            raise InvalidRequestError(f"request body nests deeper than {MAX_JSON_DEPTH} levels",
                                      field=_dotted(path[:MAX_JSON_DEPTH]))
        if isinstance(node, list) and _plain_numbers(node):
            continue  # token ids, weights: checked at C speed; only a failing list is walked element-wise
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, child in items:
            if check_text and isinstance(key, str):
                _check_str(key, (*path, key))
            if isinstance(child, dict | list):
                stack.append((child, (*path, key)))
            elif isinstance(child, bool) or child is None:
                continue
            elif isinstance(child, int):
                if not -MAX_JSON_INT - 1 <= child <= MAX_JSON_INT:
                    raise InvalidRequestError(
                        f"{_dotted((*path, key))}: integer {_short(child, 40)} is out of range "
                        f"(|value| < 2**63)", field=_dotted((*path, key)))
            elif isinstance(child, float):
                if not math.isfinite(child):
                    raise InvalidRequestError(
                        f"{_dotted((*path, key))}: {child} is not a finite number", field=_dotted((*path, key)))
            elif check_text and isinstance(child, str):
                _check_str(child, (*path, key))


def _plain_numbers(values: list[Any]) -> bool:
    """True when `values` holds only numbers, all finite and within int64 (sum/min/max run in C)."""
    if not values:
        return True
    try:
        total = sum(values)  # TypeError for strings, lists, dicts, None
        if isinstance(total, float) and not math.isfinite(total):
            return False  # a NaN or an infinity anywhere makes the sum non-finite (so may an overflow)
        # Ints among floats are range-checked too; a float beyond int64 only sends the list the slow way.
        return -MAX_JSON_INT - 1 <= min(values) and max(values) <= MAX_JSON_INT
    except TypeError:
        return False


def _check_str(value: str, path: tuple[str | int, ...]) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequestError(f"{_dotted(path)}: text holds a lone UTF-16 surrogate, which is not a "
                                  "character", field=_dotted(path)) from None


def _dotted(path: tuple[str | int, ...]) -> str:
    return ".".join(str(p) for p in path) or "body"


def json_response(value: pydantic.BaseModel | dict[str, Any] | list[Any], status: int = 200) -> web.Response:
    if isinstance(value, pydantic.BaseModel):
        return web.Response(text=value.model_dump_json(), status=status, content_type="application/json")
    return web.json_response(value, status=status)


# Requests that only wait for something (the Tinker protocol's future long-poll) hold no work: a
# stopping server cancels them at once (the client sees the connection drop and the worker gone)
# instead of letting them hold its shutdown for SHUTDOWN_GRACE_S, e.g. a DELETE of a trainer job.
LONG_POLL_SUFFIXES = ("/retrieve_future",)
# Other requests in flight at shutdown get this long to finish (aiohttp then cancels them).
SHUTDOWN_GRACE_S = 5.0
_LONG_POLLS = web.AppKey("long_polls", set)


@web.middleware
async def long_poll_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if not request.path.endswith(LONG_POLL_SUFFIXES):
        return await handler(request)
    polls = request.app[_LONG_POLLS]
    task = asyncio.current_task()
    polls.add(task)
    try:
        return await handler(request)
    finally:
        polls.discard(task)


async def _cancel_long_polls(app: web.Application) -> None:
    for task in list(app[_LONG_POLLS]):
        task.cancel()


def make_app(api_key: str | None = None, *, max_body_bytes: int | None = None,
             client_max_size: int | None = None) -> web.Application:
    """An application with the standard middlewares (errors outermost, then auth, then names).

    The body limit is `max_body_bytes` (or the older `client_max_size`), else $FIRETITAN_MAX_BODY_BYTES,
    else DEFAULT_MAX_BODY_BYTES; a larger body is a 413 naming the limit.
    """
    limit = max_body_bytes or client_max_size or _env_max_body() or DEFAULT_MAX_BODY_BYTES
    app = web.Application(middlewares=[long_poll_middleware, error_middleware, auth_middleware(api_key),
                                       name_params_middleware], client_max_size=limit)
    app[_MAX_BODY] = limit
    app[_LONG_POLLS] = set()
    app.on_shutdown.append(_cancel_long_polls)  # runs before the server waits for requests in flight
    if api_key:
        app[API_KEY] = api_key
    return app


def _env_max_body() -> int | None:
    raw = os.environ.get(MAX_BODY_ENV)
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"${MAX_BODY_ENV}={raw!r} is not a whole number of bytes", field=MAX_BODY_ENV) from None
    if value <= 0:
        raise ConfigError(f"${MAX_BODY_ENV} must be positive, got {value}", field=MAX_BODY_ENV)
    return value


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """The flags every worker takes (see docs/contracts.md)."""
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--ready-file", type=Path, default=None)
    parser.add_argument("--api-key", default=os.environ.get("FIRETITAN_WORKER_API_KEY"),
                        help="required off loopback; prefer $FIRETITAN_WORKER_API_KEY (argv is visible to ps)")
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
    """Serve until SIGTERM/SIGINT, then run the app's cleanup hooks and return.

    Every firetitan server goes through here, so none listens off loopback without a key.
    """
    require_key_off_loopback(host, app.get(API_KEY))
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=SHUTDOWN_GRACE_S)
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
    # Startup (torch, transformers, the model) made millions of long-lived objects; every full garbage
    # collection would walk them all again, holding the GIL for up to ~1 s under load and stalling
    # this loop and the health thread alike. Frozen, they are skipped by the collector (and still freed
    # by reference counting); only what the server allocates from here on is walked.
    gc.collect()
    gc.freeze()
    # Liveness off this loop (firetitan.server.health): its own thread and port, judged by a heartbeat.
    from firetitan.server.health import HEALTH_DETAIL, HealthListener

    health = HealthListener(host, app.get(API_KEY), detail=app.get(HEALTH_DETAIL))
    health_url = await asyncio.to_thread(health.start)
    heartbeat = asyncio.create_task(health.heartbeat())
    app["health_url"] = health_url
    if ready_file is not None:
        write_ready_file(ready_file, {"url": url, "pid": os.getpid(), "health_url": health_url,
                                      **(extra_ready or {})})
    from firetitan.logging import get_logger

    get_logger("firetitan.server").info("listening", url=url, health_url=health_url,
                                        health_max_lag_s=health.max_lag_s)
    watchdog = asyncio.create_task(_watch_parent(stop))
    try:
        await stop.wait()
    finally:
        watchdog.cancel()
        heartbeat.cancel()
        await runner.cleanup()
        await asyncio.to_thread(health.stop)
        # The cleanup hooks have run (state saved, queues closed). Left to itself, the interpreter's
        # final garbage collection walks every object torch and transformers created (~2 s for a
        # trainer), which a caller stopping the worker (DELETE of a trainer job) waits for; frozen
        # objects are skipped by that pass and still freed by reference counting.
        gc.freeze()


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
