"""HTTP routes of the deployment worker: completions (Fireworks + OpenAI), hot-load, metrics, health."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from firetitan.checkpoints import SnapshotStore
from firetitan.errors import ConfigError
from firetitan.logging import get_logger
from firetitan.server.common import json_response, make_app, parse_body
from firetitan.server.deployment import metrics as prom
from firetitan.server.deployment.backend import Serving, embedded_serving
from firetitan.server.deployment.completions import (
    ChoiceState,
    Limits,
    Shaper,
    metric_headers,
    parse_completion,
    usage,
)
from firetitan.server.deployment.engine import DecodeOptions, EngineRequest, StepOutput
from firetitan.server.deployment.hotload import HotLoadState, ReplicaHotLoader, SnapshotLoader
from firetitan.server.deployment.schemas import MAX_SEED, CompletionBody, HotLoadRequest
from firetitan.server.health import HEALTH_DETAIL

log = get_logger("firetitan.deployment")

# How often a request waiting on the engine checks that its client is still connected.
_DISCONNECT_POLL_S = 0.5


@dataclass
class DeploymentSettings:
    base_model: str
    deployment_id: str = "deployment"
    store_dir: Path | None = None
    replica_index: int = 0
    max_running_seqs: int = 64
    max_cached_tokens: int = 65536
    api_key: str | None = None
    seed: int = 0
    max_waiting_requests: int = 1024  # choices queued beyond the running ones; more -> 429 + Retry-After
    max_choices_per_request: int = 128  # prompts x n in one request; more -> 400 naming `n`
    max_prefill_tokens: int = 4096  # prompt tokens prefilled per engine step (longer prompts: in chunks)
    max_kv_tokens: int | None = None  # KV memory bound in positions over all rows; None: rows x model context
    device: str = "cpu"  # resolved (never "auto"): where the weights, the KV cache and the forward live
    dtype: str = "float32"  # the served weights' dtype; hot-loaded snapshots are cast to it
    threads: int | None = None  # torch threads of the engine thread (the process's only OpenMP team); None: as is
    decode: DecodeOptions = field(default_factory=DecodeOptions)  # batch packs, native kernels (float32 CPU)


class DeploymentService:
    """Owns the model, the engine thread and hot-load state; routes call into it."""

    def __init__(self, settings: DeploymentSettings, serving: Serving | None = None) -> None:
        if settings.max_cached_tokens < 2:
            raise ConfigError("--max-cached-tokens must be at least 2", field="max_cached_tokens")
        if settings.decode.batch_packs < 0:
            raise ConfigError("--batch-packs must be 0 or more", field="batch_packs")
        self.settings = settings
        if serving is None:
            serving = embedded_serving(settings.base_model, max_running_seqs=settings.max_running_seqs,
                                       max_cached_tokens=settings.max_cached_tokens, seed=settings.seed,
                                       max_prefill_tokens=settings.max_prefill_tokens,
                                       max_kv_tokens=settings.max_kv_tokens, device=settings.device,
                                       dtype=settings.dtype, threads=settings.threads,
                                       decode=settings.decode)
            log.info("model_loaded", base_model=settings.base_model, device=settings.device, dtype=settings.dtype)
        self.serving = serving
        self.model = serving.model
        self.tokenizer = serving.tokenizer
        self.limits = Limits(vocab_size=serving.vocab_size, max_positions=serving.max_positions,
                             max_cached_tokens=settings.max_cached_tokens,
                             max_choices=settings.max_choices_per_request)
        self.store = SnapshotStore(settings.store_dir) if settings.store_dir else None
        # Weights held: the live model, plus (after a base hot-load) that base for later deltas. The
        # startup weights LoRA merges need are re-read from the model on demand, not cloned.
        self.loader = None
        if self.store and serving.make_loader is not None:
            self.loader = serving.make_loader(self.store)
        elif self.store and self.model is not None and serving.startup_weights is not None:
            self.loader = SnapshotLoader(self.store, self.model.state_dict(), serving.startup_weights)
        self.hot = HotLoadState(base_model=settings.base_model)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._sinks: dict[str, _IndexedSink] = {}
        self._token_text: dict[int, str] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self.engine = serving.make_engine(self._emit)
        self._outstanding = 0  # choices submitted and not yet finished (event-loop thread only)
        self.hot_loader = ReplicaHotLoader(self.loader, self.hot, self.engine, deployment_id=settings.deployment_id,
                                           replica_index=settings.replica_index, spawn=self._spawn)

    # ---- lifecycle --------------------------------------------------------------------------------
    async def start(self, _app: web.Application) -> None:
        self._loop = asyncio.get_running_loop()
        self.engine.start()

    async def close(self, _app: web.Application) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await asyncio.to_thread(self.engine.stop)

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # ---- engine bridge ----------------------------------------------------------------------------
    def _emit(self, outputs: list[tuple[EngineRequest, StepOutput]]) -> None:
        """Called on the engine thread once per step: hand every output to the event loop at once."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._dispatch, outputs)

    def _dispatch(self, outputs: list[tuple[EngineRequest, StepOutput]]) -> None:
        for request, out in outputs:
            sink = self._sinks.get(request.request_id)
            if sink is not None:
                sink.put_nowait(out)

    def token_text(self, token_id: int) -> str:
        text = self._token_text.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id])
            self._token_text[token_id] = text
        return text

    # ---- completions ------------------------------------------------------------------------------
    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await parse_body(request, CompletionBody)
        parsed = parse_completion(body, lambda s: self.tokenizer.encode(s, add_special_tokens=False), self.limits)
        wanted = len(parsed.prompts) * parsed.n
        room = self.settings.max_running_seqs + self.settings.max_waiting_requests - self._outstanding
        if wanted > room:
            return _too_busy(wanted, self._outstanding, self.settings)
        base_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        created = int(time.time())
        model_name = body.model or self.settings.deployment_id
        queue: asyncio.Queue[tuple[int, StepOutput]] = asyncio.Queue()
        choices: list[ChoiceState] = []
        engine_reqs: list[EngineRequest] = []
        for p, (prompt, opts) in enumerate(zip(parsed.prompts, parsed.options, strict=True)):
            for j in range(parsed.n):
                index = p * parsed.n + j
                rid = f"{base_id}-{index}-{uuid.uuid4().hex[:8]}"
                seeded = opts if opts.seed is None or j == 0 else _reseed(opts, (opts.seed + j) % MAX_SEED)
                engine_reqs.append(EngineRequest(rid, prompt, seeded))
                choices.append(ChoiceState(index, prompt))
                # A JSON body needs only the whole choice: outputs are added to it as they arrive and the
                # handler wakes once per choice (its end), not once per token (which cost the event loop,
                # and through the GIL the engine thread, a task wake-up per running request per step).
                self._sinks[rid] = _IndexedSink(queue, index, None if body.stream else choices[-1])
        shaper = Shaper(self.token_text, body.raw_output, parsed.want_logprobs, parsed.top_logprobs)
        unfinished = {r.request_id for r in engine_reqs}
        self._outstanding += len(engine_reqs)
        try:
            for req in engine_reqs:
                self.engine.submit(req)
            if body.stream:
                return await self._stream(request, body, queue, choices, engine_reqs, unfinished, shaper,
                                          base_id, created, model_name)
            while unfinished:
                index, _out = await self._next(request, queue)  # only ends come here (the sink added it)
                unfinished.discard(engine_reqs[index].request_id)
            return self._full_response(body, choices, shaper, base_id, created, model_name)
        finally:
            self._outstanding -= len(engine_reqs)
            for req in engine_reqs:
                self._sinks.pop(req.request_id, None)
                if req.request_id in unfinished:
                    self.engine.abort(req.request_id)  # client gone or handler failed: free slot and cache

    def _echo_text(self, state: ChoiceState) -> str:
        return self.tokenizer.decode(state.prompt) if state.echo else ""

    async def _next(self, request: web.Request, queue: asyncio.Queue[tuple[int, StepOutput]]
                    ) -> tuple[int, StepOutput]:
        if not queue.empty():
            return queue.get_nowait()
        while True:
            try:  # a timeout scope, not wait_for: no extra task per wait (a streamed token is one wait)
                async with asyncio.timeout(_DISCONNECT_POLL_S):
                    return await queue.get()
            except TimeoutError:
                transport = request.transport
                if transport is None or transport.is_closing():
                    raise _ClientGone() from None

    def _full_response(self, body: CompletionBody, choices: list[ChoiceState], shaper: Shaper, base_id: str,
                       created: int, model_name: str) -> web.Response:
        failed = [c for c in choices if c.finish_reason in ("error", "abort")]
        if failed:
            message = failed[0].metrics.get("error", "the request was aborted by the engine")
            return web.json_response({"error": {"type": "EngineError", "message": message, "field": None}},
                                     status=500)
        out_choices = [shaper.whole(c, self._echo_text(c)) for c in choices]
        perf = dict(choices[0].metrics)
        payload: dict[str, Any] = {"id": f"cmpl-{base_id}", "object": "text_completion", "created": created,
                                   "model": model_name, "choices": out_choices, "usage": usage(choices),
                                   **self.serving.marks}
        if body.perf_metrics_in_response:
            payload["perf_metrics"] = perf
        return web.json_response(payload, headers=metric_headers(perf))

    async def _stream(self, request: web.Request, body: CompletionBody,
                      queue: asyncio.Queue[tuple[int, StepOutput]], choices: list[ChoiceState],
                      engine_reqs: list[EngineRequest], unfinished: set[str], shaper: Shaper, base_id: str,
                      created: int, model_name: str) -> web.StreamResponse:
        # Start the response only when the first output exists, so the headers can carry the queueing
        # figures (prefill-queue-duration, TTFT) that are known by then.
        first = await self._next(request, queue)
        if first[1].finish_reason in ("error", "abort"):
            unfinished.discard(engine_reqs[first[0]].request_id)
            message = first[1].metrics.get("error", "aborted") if first[1].metrics else "aborted"
            return web.json_response({"error": {"type": "EngineError", "message": message, "field": None}},
                                     status=500)
        headers = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                   **metric_headers(first[1].metrics or {})}
        response = web.StreamResponse(headers=headers)
        await response.prepare(request)
        pending = [first]
        try:
            while True:
                while not queue.empty():
                    pending.append(queue.get_nowait())
                by_choice: dict[int, list[StepOutput]] = {}
                for index, out in pending:
                    by_choice.setdefault(index, []).append(out)
                pending = []
                chunk_choices = []
                final_metrics = None
                for index, outs in by_choice.items():
                    state = choices[index]
                    echoed = next((o.prompt for o in outs if o.prompt), None) or []
                    tokens = [*echoed, *(t for o in outs for t in o.tokens)]
                    text = (self._echo_text(state) if echoed else "") + "".join(o.text for o in outs)
                    offset = len(state.text) + (len(self._echo_text(state)) if state.echo else 0)
                    for o in outs:
                        state.add(o)
                    if state.finish_reason in ("error", "abort"):
                        unfinished.discard(engine_reqs[index].request_id)
                        err = {"error": {"message": state.metrics.get("error", "aborted"), "code": 500}}
                        await response.write(f"event: error\ndata: {json.dumps(err)}\n\n".encode())
                        return response
                    chunk_choices.append(shaper.chunk(state, tokens, text, 0 if echoed else offset))
                    if state.finish_reason is not None:
                        unfinished.discard(engine_reqs[index].request_id)
                        final_metrics = state.metrics
                chunk: dict[str, Any] = {"id": f"cmpl-{base_id}", "object": "text_completion",
                                         "created": created, "model": model_name, "choices": chunk_choices}
                if not unfinished:
                    chunk["usage"] = usage(choices)
                    chunk.update(self.serving.marks)
                    if body.perf_metrics_in_response:
                        chunk["perf_metrics"] = final_metrics or choices[0].metrics
                data = b"data: " + json.dumps(chunk).encode() + b"\n\n"
                if not unfinished and request.get(DROP_DONE):
                    await response.write(data)  # fault injection (the simulation): a stream cut before [DONE]
                    return response
                if not unfinished:
                    # Last chunk, [DONE] and the end of the body in one write (one syscall, one packet).
                    await response.write_eof(data + b"data: [DONE]\n\n")
                    return response
                await response.write(data)
                pending.append(await self._next(request, queue))
        except (ConnectionResetError, _ClientGone):
            raise _ClientGone() from None

    # ---- hot-load (firetitan/server/deployment/hotload.py) -------------------------------------------
    def hot_load_status(self) -> dict[str, Any]:
        return self.hot_loader.status().model_dump(mode="json")

    async def hot_load(self, request: web.Request) -> web.Response:
        body = await parse_body(request, HotLoadRequest)
        return json_response((await self.hot_loader.load(body)).model_dump(mode="json"))


# Request key a fault-injecting middleware sets to end this stream without `[DONE]` (tests, simulation).
DROP_DONE = "firetitan.drop_done"
# Retry-After for a full queue: long enough for a batch of decode steps to free slots.
_BUSY_RETRY_AFTER_S = 1


def _too_busy(wanted: int, outstanding: int, settings: DeploymentSettings) -> web.Response:
    limit = settings.max_running_seqs + settings.max_waiting_requests
    message = (f"the deployment holds {outstanding} choices (limit {limit} = --max-running-seqs "
               f"{settings.max_running_seqs} + --max-waiting-requests {settings.max_waiting_requests}); "
               f"{wanted} more do not fit, retry after {_BUSY_RETRY_AFTER_S} s")
    return web.json_response({"error": {"type": "RateLimitError", "message": message, "field": None}},
                             status=429, headers={"Retry-After": str(_BUSY_RETRY_AFTER_S)})


class _ClientGone(Exception):
    """The HTTP client disconnected; the handler's cleanup aborts its engine requests."""


class _IndexedSink:
    """Tags a request's outputs with its choice index on a queue shared by the request's choices.

    With `collect` (a non-streamed choice) each output is added to that choice here and only its last
    output is queued, so the handler wakes once per choice.
    """

    def __init__(self, queue: asyncio.Queue[tuple[int, StepOutput]], index: int,
                 collect: ChoiceState | None = None) -> None:
        self.queue, self.index, self.collect = queue, index, collect

    def put_nowait(self, out: StepOutput) -> None:
        if self.collect is not None:
            self.collect.add(out)
            if out.finish_reason is None:
                return
        self.queue.put_nowait((self.index, out))


def _reseed(opts: Any, seed: int) -> Any:
    from dataclasses import replace

    return replace(opts, seed=seed)


@web.middleware
async def _client_gone_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        return await handler(request)
    except _ClientGone:
        # Nobody is listening; the response object is never sent.
        return web.Response(status=499)


def build_app(settings: DeploymentSettings, serving: Serving | None = None) -> web.Application:
    """The deployment's routes over `serving` (default: the embedded torch engine on `settings.base_model`)."""
    service = DeploymentService(settings, serving)
    app = make_app(settings.api_key)
    app.middlewares.append(_client_gone_middleware)
    app["service"] = service
    app.on_startup.append(service.start)
    app.on_cleanup.append(service.close)

    def health_detail() -> dict[str, Any]:
        # Plain attributes only: the health listener calls this from its own thread.
        return {"status": "ok", "deployment_id": settings.deployment_id,
                "policy_version": service.engine.policy_version,
                "current_snapshot_identity": service.hot.current_identity,
                "device": settings.device, "dtype": settings.dtype, **service.serving.marks}

    app[HEALTH_DETAIL] = health_detail

    async def health(_request: web.Request) -> web.Response:
        problem = await service.serving.probe() if service.serving.probe is not None else None
        body = {**health_detail(), **(problem or {})}
        if problem is not None:
            body["status"] = "unavailable"
        return web.json_response(body, status=200 if problem is None else 503)

    async def metrics(_request: web.Request) -> web.Response:
        text = prom.render(service.engine, settings.deployment_id, service.hot.current_identity)
        if service.serving.extra_metrics is not None:
            text += await service.serving.extra_metrics()
        return web.Response(text=text, content_type="text/plain", charset="utf-8",
                            headers={"X-Content-Type": "version=0.0.4"})

    async def hot_load_get(_request: web.Request) -> web.Response:
        return json_response(service.hot_load_status())

    app.router.add_post("/inference/v1/completions", service.completions)
    app.router.add_post("/v1/completions", service.completions)
    app.router.add_post("/hot_load/v1/models/hot_load", service.hot_load)
    app.router.add_get("/hot_load/v1/models/hot_load", hot_load_get)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/health", health)
    return app
