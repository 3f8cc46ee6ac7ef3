"""HTTP routes of the vLLM-backed deployment worker: firetitan's deployment contract in front of a `vllm serve` child."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from firetitan.checkpoints import SnapshotStore, validate_name
from firetitan.errors import ConflictError, FiretitanError
from firetitan.logging import get_logger
from firetitan.models import load_tokenizer, model_config
from firetitan.server.common import json_response, make_app, parse_body
from firetitan.server.deployment.completions import (
    ChoiceState,
    Limits,
    Shaper,
    metric_headers,
    parse_completion,
    usage,
)
from firetitan.server.deployment.hotload import HotLoadState, LoadingState
from firetitan.server.deployment.request import SamplingOptions, StepOutput
from firetitan.server.deployment.schemas import CompletionBody, HotLoadBody
from firetitan.server.deployment.vllm_backend.child import VllmChild
from firetitan.server.deployment.vllm_backend.hotload import VllmWeights, swap_in_place
from firetitan.server.deployment.vllm_backend.sampling import (
    ChoiceRun,
    is_model_distribution,
    rescore,
    stream_choice,
    vllm_body,
)

log = get_logger("firetitan.deployment.vllm")

_MAX_CONNECTIONS = 1024  # front -> vLLM connections (bounded; one per running choice)


@dataclass(frozen=True)
class VllmDeploymentSettings:
    base_model: str  # name reported to clients and the first policy version
    model_dir: Path  # the HF directory vLLM serves
    deployment_id: str = "deployment"
    replica_index: int = 0
    store_dir: Path | None = None
    scratch_dir: Path | None = None
    max_model_len: int = 2048
    api_key: str | None = None


class VllmDeployment:
    """Routes requests to the child, shapes its answers, and runs hot-loads."""

    def __init__(self, settings: VllmDeploymentSettings, child: VllmChild) -> None:
        self.settings, self.child = settings, child
        self.tokenizer = load_tokenizer(settings.model_dir)
        config = model_config(settings.model_dir)
        self.limits = Limits(vocab_size=int(config.vocab_size),
                             max_positions=min(settings.max_model_len, int(config.max_position_embeddings)),
                             max_cached_tokens=settings.max_model_len)
        self.policy_version = settings.base_model
        self.hot = HotLoadState(base_model=settings.base_model)
        self.weights: VllmWeights | None = None
        if settings.store_dir is not None:
            scratch = settings.scratch_dir or settings.model_dir.parent / f"{settings.deployment_id}-scratch"
            self.weights = VllmWeights(SnapshotStore(settings.store_dir), settings.model_dir, scratch)
        self._hot_lock = asyncio.Lock()
        self._admitting = asyncio.Event()
        self._admitting.set()
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._last_chunk = 0.0
        self._session: aiohttp.ClientSession | None = None
        self._token_text: dict[int, str] = {}
        self._tasks: set[asyncio.Task[Any]] = set()

    async def start(self, _app: web.Application) -> None:
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=_MAX_CONNECTIONS),
                                              timeout=aiohttp.ClientTimeout(total=None, sock_connect=30))
        await self._post_json("/update_weight_version", {"new_version": self.policy_version})

    async def close(self, _app: web.Application) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._session is not None:
            await self._session.close()
        self.child.stop()

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "started"
        return self._session

    async def _post_json(self, path: str, body: dict[str, Any]) -> None:
        async with self.session.post(f"{self.child.url}{path}", json=body) as resp:
            resp.raise_for_status()

    def token_text(self, token_id: int) -> str:
        text = self._token_text.get(token_id)
        if text is None:
            text = self._token_text[token_id] = self.tokenizer.decode([token_id])
        return text

    # ---- completions ------------------------------------------------------------------------------
    async def _choice(self, index: int, prompt: list[int], opts: SamplingOptions, ignore_eos: bool,
                      run: ChoiceRun, buffer: bool) -> AsyncIterator[tuple[int, StepOutput]]:
        await self._admitting.wait()  # SYNC hot-load: new work waits for the new weights
        self._in_flight += 1
        self._idle.clear()
        try:
            body = vllm_body(self.settings.deployment_id, prompt, opts, ignore_eos)
            held: list[StepOutput] = []
            async for out in stream_choice(self.session, self.child.url, body, opts, lambda: self.policy_version,
                                           run):
                self._last_chunk = time.monotonic()
                if buffer:
                    held.append(out)
                else:
                    yield index, out
            if buffer:
                # The model's own logprobs (untempered) need one more prefill when the sampled
                # distribution was not the model's: done once, at the end.
                tokens = [t for o in held for t in o.tokens]
                await rescore(self.session, self.child.url, self.settings.deployment_id, prompt, tokens)
                last = held[-1]
                yield index, StepOutput(tokens, "".join(o.text for o in held), last.finish_reason, last.metrics)
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await parse_body(request, CompletionBody)
        parsed = parse_completion(body, lambda s: self.tokenizer.encode(s, add_special_tokens=False), self.limits)
        base_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        created, model_name = int(time.time()), body.model or self.settings.deployment_id
        run = ChoiceRun(time.monotonic(), self._in_flight)
        queue: asyncio.Queue[tuple[int, StepOutput | BaseException]] = asyncio.Queue()
        choices: list[ChoiceState] = []
        producers: list[asyncio.Task[None]] = []

        async def produce(gen: AsyncIterator[tuple[int, StepOutput]], index: int) -> None:
            try:
                async for item in gen:
                    queue.put_nowait(item)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # handed to the handler, which answers with it
                queue.put_nowait((index, exc))

        for p, (prompt, opts) in enumerate(zip(parsed.prompts, parsed.options, strict=True)):
            for j in range(parsed.n):
                index = p * parsed.n + j
                seeded = opts if opts.seed is None or j == 0 else _reseed(opts, opts.seed + j)
                choices.append(ChoiceState(index, prompt))
                gen = self._choice(index, prompt, seeded, body.ignore_eos, run, not is_model_distribution(seeded))
                producers.append(asyncio.create_task(produce(gen, index)))
        shaper = Shaper(self.token_text, body.raw_output, parsed.want_logprobs, parsed.top_logprobs)
        try:
            if body.stream:
                return await self._stream(request, body, queue, choices, shaper, base_id, created, model_name)
            unfinished = set(range(len(choices)))
            while unfinished:
                index, out = await queue.get()
                if isinstance(out, BaseException):
                    raise out
                choices[index].add(out)
                if out.finish_reason is not None:
                    unfinished.discard(index)
            out_choices = [shaper.choice(c.index, c.prompt, c.tokens, c.text, c.finish_reason, 0) for c in choices]
            perf = dict(choices[0].metrics)
            payload: dict[str, Any] = {"id": f"cmpl-{base_id}", "object": "text_completion", "created": created,
                                       "model": model_name, "choices": out_choices, "usage": usage(choices)}
            if body.perf_metrics_in_response:
                payload["perf_metrics"] = perf
            return web.json_response(payload, headers=metric_headers(perf))
        finally:
            for task in producers:
                task.cancel()  # client gone or handler failed: closing the vLLM stream aborts it there

    async def _stream(self, request: web.Request, body: CompletionBody,
                      queue: asyncio.Queue[tuple[int, StepOutput | BaseException]], choices: list[ChoiceState],
                      shaper: Shaper, base_id: str, created: int, model_name: str) -> web.StreamResponse:
        first = await queue.get()
        if isinstance(first[1], BaseException):
            raise first[1]
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                               **metric_headers(first[1].metrics or {})})
        await response.prepare(request)
        unfinished = set(range(len(choices)))
        sent_prompt: set[int] = set()
        item: tuple[int, StepOutput | BaseException] = first
        while True:
            index, out = item
            if isinstance(out, BaseException):
                message = getattr(out, "message", None) or str(out)
                err = {"error": {"message": message, "code": 500}}
                await response.write_eof(f"event: error\ndata: {json.dumps(err)}\n\n".encode())
                return response
            state = choices[index]
            offset = len(state.text)
            state.add(out)
            prompt = None if index in sent_prompt else state.prompt
            sent_prompt.add(index)
            chunk: dict[str, Any] = {"id": f"cmpl-{base_id}", "object": "text_completion", "created": created,
                                     "model": model_name, "choices": [shaper.choice(
                                         index, prompt, out.tokens, out.text, state.finish_reason, offset)]}
            if out.finish_reason is not None:
                unfinished.discard(index)
            if not unfinished:
                chunk["usage"] = usage(choices)
                if body.perf_metrics_in_response:
                    chunk["perf_metrics"] = state.metrics
                await response.write_eof(b"data: " + json.dumps(chunk).encode() + b"\n\ndata: [DONE]\n\n")
                return response
            await response.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
            item = await queue.get()

    # ---- health, metrics ----------------------------------------------------------------------------
    async def health(self, _request: web.Request) -> web.Response:
        ok = self.child.alive()
        if ok:
            try:
                async with self.session.get(f"{self.child.url}/health") as resp:
                    ok = resp.status == 200
            except aiohttp.ClientError:
                ok = False
        body = {"status": "ok" if ok else "unavailable", "backend": "vllm", "policy_version": self.policy_version,
                "deployment_id": self.settings.deployment_id, "running": self._in_flight}
        if not ok:
            body["log_tail"] = self.child.log_tail()[-1500:]
        return web.json_response(body, status=200 if ok else 503)

    async def metrics(self, _request: web.Request) -> web.Response:
        """vLLM's own Prometheus metrics (`vllm:*`), plus firetitan's hot-load figures."""
        async with self.session.get(f"{self.child.url}/metrics") as resp:
            text = await resp.text()
        label = f'deployment="{self.settings.deployment_id}"'
        swaps = sum(1 for h in self.hot.history if h.get("status") == "loaded")
        extra = ["# TYPE firetitan_hot_load_swaps_total counter", f"firetitan_hot_load_swaps_total{{{label}}} {swaps}",
                 "# TYPE firetitan_requests_running gauge", f"firetitan_requests_running{{{label}}} {self._in_flight}"]
        return web.Response(text=text + "\n".join(extra) + "\n", content_type="text/plain")

    # ---- hot-load -----------------------------------------------------------------------------------
    def hot_load_status(self) -> dict[str, Any]:
        hot = self.hot
        ready = hot.loading.stage not in ("loading", "swapping")
        replica = {"replica_index": self.settings.replica_index, "readiness": ready,
                   "current_snapshot_identity": hot.current_identity, "base_snapshot_identity": hot.base_identity,
                   "policy_version": self.policy_version, "loading_state": hot.loading.to_dict(),
                   "loaded_adapters": hot.loaded_adapters}
        return {"deployment_id": self.settings.deployment_id, "base_model": self.settings.base_model,
                "readiness": ready, "current_snapshot_identity": hot.current_identity,
                "policy_version": self.policy_version, "loading_state": hot.loading.to_dict(),
                "replicas": [replica], "history": hot.history[-20:]}

    async def hot_load(self, request: web.Request) -> web.Response:
        body = await parse_body(request, HotLoadBody)
        identity = validate_name(body.identity, field="identity")
        if self.weights is None:
            raise ConflictError("this deployment was started without --store-dir; it cannot hot-load",
                                field="identity")
        previous = body.incremental_snapshot_metadata.previous_snapshot_identity \
            if body.incremental_snapshot_metadata else None
        await self._hot_lock.acquire()
        try:
            self.hot.loading = LoadingState("loading", identity, body.mode, started_at=time.time())
            try:
                await asyncio.to_thread(self.weights.check_chain, identity, previous, self.hot)
                prepared, directory = await asyncio.to_thread(self.weights.prepare, identity, self.hot)
            except FiretitanError as exc:
                self._record_error(identity, exc)
                raise
            self.hot.loading.stage = "swapping"
        except BaseException:
            self._hot_lock.release()
            raise
        task = asyncio.create_task(self._swap(prepared, directory, body.mode))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if body.mode == "ASYNC":
            await asyncio.shield(task)
            if self.hot.loading.stage == "error" and self.hot.loading.identity == identity:
                raise ConflictError(f"hot-load of {identity!r} failed: {self.hot.loading.error}", field="identity")
        return json_response({"identity": identity, "mode": body.mode, **self.hot_load_status()})

    async def _swap(self, prepared: Any, directory: Path, mode: str) -> None:
        sync = mode == "SYNC"
        try:
            if sync:  # admission stops; running requests finish on the old weights
                self._admitting.clear()
                await self._idle.wait()

            def flip() -> None:
                self.policy_version = prepared.identity

            await swap_in_place(self.session, self.child.url, directory, prepared.identity, not sync, flip,
                                lambda: self._last_chunk)
            hot = self.hot
            hot.current_identity = prepared.identity
            if prepared.kind == "base":
                hot.base_identity, hot.base_state_dict = prepared.identity, prepared.state_dict
            hot.loaded_adapters = ([{"identity": prepared.identity, "status": "loaded"}]
                                   if prepared.kind == "lora" else [])
            hot.loading.stage, hot.loading.finished_at = "done", time.time()
            hot.history.append({"identity": prepared.identity, "kind": prepared.kind, "status": "loaded",
                                "at": hot.loading.finished_at})
        except Exception as exc:  # recorded; the deployment keeps serving what vLLM holds
            self._record_error(prepared.identity, exc)
        finally:
            self._admitting.set()
            self._hot_lock.release()

    def _record_error(self, identity: str, exc: BaseException) -> None:
        message = getattr(exc, "message", None) or str(exc)
        self.hot.loading.stage, self.hot.loading.error = "error", message
        self.hot.loading.finished_at = time.time()
        self.hot.history.append({"identity": identity, "status": "error", "error": message,
                                 "at": self.hot.loading.finished_at})
        log.warning("hot_load_refused", identity=identity, error=message, serving=self.policy_version)


def _reseed(opts: SamplingOptions, seed: int) -> SamplingOptions:
    from dataclasses import replace

    return replace(opts, seed=seed)


def build_app(settings: VllmDeploymentSettings, child: VllmChild) -> web.Application:
    app = make_app(settings.api_key)
    dep = VllmDeployment(settings, child)
    app["deployment"] = dep
    app.on_startup.append(dep.start)
    app.on_cleanup.append(dep.close)

    async def hot_load_get(_request: web.Request) -> web.Response:
        return json_response(dep.hot_load_status())

    app.router.add_post("/inference/v1/completions", dep.completions)
    app.router.add_post("/v1/completions", dep.completions)
    app.router.add_get("/health", dep.health)
    app.router.add_get("/metrics", dep.metrics)
    app.router.add_post("/hot_load/v1/models/hot_load", dep.hot_load)
    app.router.add_get("/hot_load/v1/models/hot_load", hot_load_get)
    return app
