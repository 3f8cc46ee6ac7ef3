"""The trainer worker's aiohttp routes: parse and validate off the event loop, queue the work, long-poll.

Decoding, validation and batch preparation of a submission run in a thread, and so does encoding a
large result, so `/health` answers while torch or a big body keeps a CPU busy.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, TypeVar

import anyio
import pydantic
from aiohttp import web

from firetitan.errors import FiretitanError, InvalidRequestError
from firetitan.logging import get_logger
from firetitan.server.common import json_response, make_app
from firetitan.server.health import HEALTH_DETAIL
from firetitan.server.trainer import schemas as s
from firetitan.server.trainer.queue import FutureRecord
from firetitan.server.trainer.service import ModelSession, TrainerService, TrainerSettings, state_name
from firetitan.types import LoraConfig

__all__ = ["TrainerService", "TrainerSettings", "build_app", "state_name"]

log = get_logger("firetitan.server.trainer")

# A long poll never holds a request longer than this (clients use a longer HTTP timeout).
MAX_POLL_SECONDS = 30.0
API = "/api/v1"
# Client sessions (create_session / session_heartbeat) remembered; the oldest are forgotten beyond it.
MAX_CLIENT_SESSIONS = 1024
# Telemetry is accepted and dropped; a batch larger than this is a 413.
MAX_TELEMETRY_BYTES = 1 << 20
# Result bodies at least this large (estimated) are JSON-encoded in a thread.
_ENCODE_IN_THREAD = 64 * 1024

M = TypeVar("M", bound=pydantic.BaseModel)


def invalid_from_validation(exc: pydantic.ValidationError) -> InvalidRequestError:
    """The first pydantic error as a 400 naming its field."""
    first = exc.errors()[0] if exc.errors() else {}
    field = ".".join(str(p) for p in first.get("loc", ())) or None
    got = str(first.get("input"))[:200].encode("utf-8", "replace").decode("utf-8")
    return InvalidRequestError(f"{field or 'body'}: {first.get('msg', exc)} (got {got!r})", field=field)


def _decode(raw_bytes: bytes) -> Any:
    try:
        return json.loads(raw_bytes)
    except (ValueError, RecursionError) as exc:  # RecursionError: JSON nested thousands deep
        raise InvalidRequestError(f"request body is not valid JSON: {str(exc)[:200]}", field="body") from None


async def read_json(request: web.Request) -> Any:
    """The JSON body (`application/json` required), decoded in a thread."""
    ctype = request.content_type
    if ctype != "application/json" and not ctype.endswith("+json"):
        raise InvalidRequestError(f"Content-Type must be application/json, got {ctype!r}",
                                  field="Content-Type", status_code=415)
    raw_bytes = await request.read()
    if len(raw_bytes) < 4096:
        return _decode(raw_bytes)
    return await anyio.to_thread.run_sync(_decode, raw_bytes)


def _validate(model: type[M], raw: Any) -> M:
    if not isinstance(raw, dict):
        raise InvalidRequestError("request body must be a JSON object", field="body")
    try:
        return model.model_validate(raw)
    except pydantic.ValidationError as exc:
        raise invalid_from_validation(exc) from None
    except RecursionError:
        raise InvalidRequestError("request body is nested too deeply", field="body") from None


async def parse(request: web.Request, model: type[M]) -> M:
    raw = await read_json(request)
    return await anyio.to_thread.run_sync(_validate, model, raw)


def _internal(exc: Exception, kind: str) -> FiretitanError:
    """A bug while checking a submission: logged with an id; the client sees the id, not the text."""
    error_id = secrets.token_hex(4)
    log.error("submission_check_failed", kind=kind, error_id=error_id, error=f"{type(exc).__name__}: {exc}")
    return FiretitanError(f"internal error checking the {kind} request (error id {error_id})", status_code=500)


def _accepted(rec: FutureRecord) -> web.Response:
    return json_response({"request_id": rec.request_id, "model_id": rec.model_id})


async def _encode(body: Any, status: int) -> web.Response:
    text = await anyio.to_thread.run_sync(json.dumps, body) if _large(body) else json.dumps(body)
    return web.Response(text=text, status=status, content_type="application/json")


def _large(body: Any) -> bool:
    outputs = body.get("loss_fn_outputs") if isinstance(body, dict) else None
    return isinstance(outputs, list) and len(outputs) * 512 > _ENCODE_IN_THREAD


class ClientSessions:
    """Tinker-style client sessions: ids handed out by create_session, last heartbeat of each (bounded)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.last_seen: OrderedDict[str, float] = OrderedDict()

    def create(self) -> str:
        sid = f"{self.prefix}-{secrets.token_hex(6)}"
        self.touch(sid)
        return sid

    def touch(self, sid: str) -> None:
        # Unknown ids are adopted: a restarted trainer must not fail a client's heartbeats.
        self.last_seen[sid] = time.monotonic()
        self.last_seen.move_to_end(sid)
        while len(self.last_seen) > MAX_CLIENT_SESSIONS:
            self.last_seen.popitem(last=False)


def build_app(settings: TrainerSettings) -> web.Application:
    service = TrainerService(settings)
    sessions = ClientSessions(f"sess-{settings.job_id or 'trainer'}")
    app = make_app(settings.api_key)
    # Read on the health listener's thread (counters and plain attributes, never torch).
    app[HEALTH_DETAIL] = lambda: service.health(detailed=True)
    app["service"] = service
    routes = web.RouteTableDef()

    def has_key(request: web.Request) -> bool:
        if not settings.api_key:
            return True
        given = request.headers.get("x-api-key") or ""
        auth = request.headers.get("Authorization", "")
        if auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        return hmac.compare_digest(given.encode(), settings.api_key.encode())

    @routes.get(f"{API}/healthz")
    @routes.get("/health")
    async def healthz(request: web.Request) -> web.Response:
        return json_response(service.health(detailed=has_key(request)))

    @routes.post(f"{API}/create_model")
    async def create_model(request: web.Request) -> web.Response:
        return _accepted(service.create_model(await parse(request, s.CreateModelRequest)))

    @routes.post(f"{API}/get_info")
    async def get_info(request: web.Request) -> web.Response:
        req = await parse(request, s.ModelRef)
        sess = service.session(req.model_id)
        if sess.created is not None and not sess.created.done.is_set():
            await asyncio.wait_for(sess.created.done.wait(), timeout=600)
        return json_response(sess.require_engine().info())

    @routes.post(f"{API}/unload_model")
    async def unload_model(request: web.Request) -> web.Response:
        req = await parse(request, s.ModelRef)
        await service.unload(req.model_id)
        return json_response({"model_id": req.model_id, "type": "unload_model"})

    @routes.post(f"{API}/list_checkpoints")
    async def list_checkpoints(request: web.Request) -> web.Response:
        req = await parse(request, s.ModelRef)
        service.session(req.model_id)
        names = [info.name for info in service.states.list() if info.name]
        return json_response({"checkpoints": names})

    @routes.post(f"{API}/save_latest")
    async def save_latest(request: web.Request) -> web.Response:
        return _accepted(service.save_latest(await parse(request, s.ModelRef)))

    JobMaker = Callable[[ModelSession], Any]

    async def sequenced(request: web.Request, model: type[M], kind: str,
                        job: Callable[[M], JobMaker]) -> web.Response:
        """Parse, validate and queue a seq-ordered submission. A refusal whose model_id and seq_id are
        readable consumes that seq_id with a failed future (its id comes back as `request_id`), so the
        session's next call is never held back by the gap."""
        raw: Any = None
        try:
            raw = await read_json(request)

            def prepare() -> tuple[M, JobMaker]:
                req = _validate(model, raw)
                return req, job(req)

            req, make_job = await anyio.to_thread.run_sync(prepare)
            sess = service.session(req.model_id)
            known = sess.queue.known(req.session_id, req.seq_id)
            if known is not None:
                return _accepted(known)
            fn = await anyio.to_thread.run_sync(make_job, sess)  # batch checks and packing, off the loop
            return _accepted(service.submit(req, kind, lambda _sess: fn))
        except Exception as caught:
            exc = caught if isinstance(caught, FiretitanError) else _internal(caught, kind)
            if exc.status_code == 429:  # full queue: retryable, so the seq_id is left for the retry
                return web.json_response(exc.to_body(), status=429, headers={"Retry-After": "1"})
            rid = service.reject(raw, kind, exc)
            body = exc.to_body()
            if rid is not None:
                body["request_id"] = rid
            return web.json_response(body, status=exc.status_code)

    @routes.post(f"{API}/forward")
    async def forward(request: web.Request) -> web.Response:
        return await sequenced(request, s.ForwardRequest, "forward", lambda r: service.forward_job(r, False))

    @routes.post(f"{API}/forward_backward")
    async def forward_backward(request: web.Request) -> web.Response:
        return await sequenced(request, s.ForwardBackwardRequest, "forward_backward",
                               lambda r: service.forward_job(r, not r.forward_only))

    @routes.post(f"{API}/optim_step")
    async def optim_step(request: web.Request) -> web.Response:
        return await sequenced(request, s.OptimStepRequest, "optim_step", service.optim_step_job)

    @routes.post(f"{API}/save_weights")
    async def save_weights(request: web.Request) -> web.Response:
        return await sequenced(request, s.SaveWeightsRequest, "save_weights", service.save_weights_job)

    @routes.post(f"{API}/save_weights_for_sampler")
    async def save_weights_for_sampler(request: web.Request) -> web.Response:
        return await sequenced(request, s.SaveWeightsForSamplerRequest, "save_weights_for_sampler",
                               service.save_for_sampler_job)

    @routes.post(f"{API}/load_weights")
    async def load_weights(request: web.Request) -> web.Response:
        return await sequenced(request, s.LoadWeightsRequest, "load_weights", service.load_weights_job)

    @routes.post(f"{API}/release_seq")
    async def release_seq(request: web.Request) -> web.Response:
        req = await parse(request, s.ReleaseSeqRequest)
        service.session(req.model_id).queue.release(req.session_id, req.seq_id)
        return json_response({"released": req.seq_id})

    @routes.post(f"{API}/retrieve_future")
    async def retrieve_future(request: web.Request) -> web.Response:
        req = await parse(request, s.RetrieveFutureRequest)
        rec = service.futures.get(req.request_id)
        wait = MAX_POLL_SECONDS if req.timeout is None else min(req.timeout, MAX_POLL_SECONDS)
        try:
            if not rec.done.is_set():  # (wait_for with timeout 0 would time out even on a done future)
                await asyncio.wait_for(rec.done.wait(), timeout=wait)
        except TimeoutError:
            return json_response({"type": "try_again", "request_id": rec.request_id, "queue_state": "active"})
        assert rec.body is not None
        return await _encode(rec.body, rec.status)

    # -- Tinker / fireworks client sessions: bookkeeping only (the control plane's gateway counts
    # every proxied call, heartbeats included, as trainer activity for its idle stop).
    @routes.post(f"{API}/create_session")
    async def create_session(request: web.Request) -> web.Response:
        await parse(request, s.CreateSessionRequest)
        return json_response({"type": "create_session", "session_id": sessions.create(),
                              "info_message": None, "warning_message": None, "error_message": None})

    @routes.post(f"{API}/session_heartbeat")
    async def session_heartbeat(request: web.Request) -> web.Response:
        sessions.touch((await parse(request, s.SessionRef)).session_id)
        return json_response({"type": "session_heartbeat"})

    @routes.post(f"{API}/telemetry")
    async def telemetry(request: web.Request) -> web.Response:
        if (request.content_length or 0) > MAX_TELEMETRY_BYTES:
            raise InvalidRequestError(f"telemetry batch over {MAX_TELEMETRY_BYTES} bytes", field="body",
                                      status_code=413)
        seen = 0
        async for chunk in request.content.iter_chunked(64 * 1024):  # drained and dropped
            seen += len(chunk)
            if seen > MAX_TELEMETRY_BYTES:
                raise InvalidRequestError(f"telemetry batch over {MAX_TELEMETRY_BYTES} bytes", field="body",
                                          status_code=413)
        return json_response({"status": "accepted"})

    @routes.post(f"{API}/client/config")
    async def client_config(request: web.Request) -> web.Response:
        return json_response({})  # no feature flags: the SDK's defaults

    app.add_routes(routes)

    async def preload(app: web.Application) -> None:
        if settings.base_model:
            lora = LoraConfig(rank=settings.lora_rank) if settings.lora_rank > 0 else None
            service.create_model(s.CreateModelRequest(base_model=settings.base_model, lora_config=lora,
                                                      model_id=settings.job_id or "default"), preload=True)

    async def shutdown(app: web.Application) -> None:
        await service.close()

    app.on_startup.append(preload)
    app.on_cleanup.append(shutdown)
    return app

