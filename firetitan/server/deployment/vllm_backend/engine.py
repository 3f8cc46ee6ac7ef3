"""`VllmEngine`: the `EngineBackend` that runs each choice as one streamed request to a `vllm serve` child.

The deployment routes (completions shaping, admission, hot-load, health, metrics) are the embedded
worker's own (`server/deployment/app.py`); this module only turns `EngineRequest`s into vLLM requests and
vLLM chunks into `StepOutput`s, and applies `WeightSwap`s by reloading vLLM's weights from a directory.
It lives on the app's event loop: `submit`, `abort` and `swap_weights` start or cancel tasks there.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp

from firetitan.errors import InvalidRequestError
from firetitan.logging import get_logger
from firetitan.models import load_tokenizer, model_config
from firetitan.server.deployment.backend import Emit, Serving
from firetitan.server.deployment.engine import EngineRequest, EngineStats, StepOutput, WeightSwap
from firetitan.server.deployment.vllm_backend.child import VllmChild
from firetitan.server.deployment.vllm_backend.hotload import VllmSnapshotLoader, swap_in_place
from firetitan.server.deployment.vllm_backend.sampling import (
    ChoiceRun,
    is_model_distribution,
    rescore,
    stream_choice,
    vllm_body,
)

log = get_logger("firetitan.deployment.vllm")

_MAX_CONNECTIONS = 1024  # front -> vLLM connections (bounded; one per running choice)
_STOP_TIMEOUT_S = 10.0


class VllmEngine:
    """Choices as tasks streaming from the child; swaps as tasks pausing, reloading and resuming it."""

    def __init__(self, child: VllmChild, served_name: str, policy_version: str, max_cached_tokens: int,
                 emit: Emit) -> None:
        self.child, self.served_name = child, served_name
        self._policy_version = policy_version
        self._max_cached_tokens = max_cached_tokens
        self._emit = emit
        self.stats = EngineStats()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._session: aiohttp.ClientSession | None = None
        self._running: dict[str, tuple[EngineRequest, asyncio.Task[None]]] = {}
        self._swaps: set[asyncio.Task[None]] = set()
        self._admitting = asyncio.Event()  # cleared while a SYNC swap drains the running choices
        self._admitting.set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._in_flight = 0  # choices holding a vLLM stream (admitted past a SYNC swap)
        self._last_chunk = 0.0

    # ---- EngineBackend -------------------------------------------------------------------------------
    @property
    def policy_version(self) -> str:
        return self._policy_version

    @property
    def num_waiting(self) -> int:
        return len(self._running) - self._in_flight  # held at the front by a SYNC swap

    @property
    def num_running(self) -> int:
        return self._in_flight

    @property
    def cached_tokens(self) -> int:
        return sum(len(r.prompt) + len(r.output_ids) for r, _ in self._running.values())

    @property
    def reserved_tokens(self) -> int:
        return sum(r.reserved_tokens for r, _ in self._running.values())

    @property
    def max_cached_tokens(self) -> int:
        return self._max_cached_tokens

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()  # DeploymentService.start calls this on the app's loop
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=_MAX_CONNECTIONS),
                                              timeout=aiohttp.ClientTimeout(total=None, sock_connect=30))

    def stop(self, timeout: float = _STOP_TIMEOUT_S) -> None:
        """Called from a worker thread (the app's cleanup): cancel every task and close the session."""
        if self._loop is None or self._loop.is_closed():
            return
        asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(timeout)

    async def _close(self) -> None:
        tasks = [t for _, t in self._running.values()] + list(self._swaps)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    def submit(self, request: EngineRequest) -> None:
        if request.options.echo:
            raise InvalidRequestError("echo is not supported by the vLLM backend (engine: vllm)", field="echo")
        assert self._loop is not None, "started"
        request.concurrent_at_arrival = len(self._running)
        task = self._loop.create_task(self._choice(request))
        self._running[request.request_id] = (request, task)

    def abort(self, request_id: str) -> None:
        entry = self._running.get(request_id)
        if entry is not None:
            entry[1].cancel()  # closing the vLLM stream aborts the request there

    def swap_weights(self, swap: WeightSwap) -> None:
        assert self._loop is not None, "started"
        task = self._loop.create_task(self._swap(swap))
        self._swaps.add(task)
        task.add_done_callback(self._swaps.discard)

    # ---- choices -------------------------------------------------------------------------------------
    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "started"
        return self._session

    async def _choice(self, request: EngineRequest) -> None:
        opts = request.options
        run = ChoiceRun(request.arrival, request.concurrent_at_arrival)
        buffer = not is_model_distribution(opts)
        held: list[StepOutput] = []
        try:
            await self._admitting.wait()  # SYNC hot-load: new work waits for the new weights
            self._in_flight += 1
            self._idle.clear()
            try:
                body = vllm_body(self.served_name, request.prompt, opts, opts.ignore_eos)
                async for out in stream_choice(self.session, self.child.url, body, opts,
                                               lambda: self._policy_version, run):
                    self._last_chunk = time.monotonic()
                    request.output_ids.extend(t.token_id for t in out.tokens)
                    if buffer:
                        held.append(out)
                    else:
                        self._deliver(request, out)
                if buffer and held:
                    # The model's own (untempered) logprobs need one more prefill when the sampled
                    # distribution was not the model's: done once, at the end.
                    tokens = [t for o in held for t in o.tokens]
                    await rescore(self.session, self.child.url, self.served_name, request.prompt, tokens)
                    last = held[-1]
                    self._deliver(request, StepOutput(tokens, "".join(o.text for o in held), last.finish_reason,
                                                      last.metrics))
            finally:
                self._in_flight -= 1
                if self._in_flight == 0:
                    self._idle.set()
        except asyncio.CancelledError:
            self._count("abort")
        except Exception as exc:  # the route answers 500 / an SSE error event with this message
            message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
            log.warning("vllm_request_failed", request_id=request.request_id, error=message)
            self._deliver(request, StepOutput([], "", "error", {"error": message}))
        finally:
            self._running.pop(request.request_id, None)

    def _deliver(self, request: EngineRequest, out: StepOutput) -> None:
        stats = self.stats
        if out.tokens:
            stats.generated_tokens += len(out.tokens)
            stats.recent.append((time.monotonic(), len(out.tokens)))
        if out.finish_reason is not None:
            self._count(out.finish_reason)
            metrics = out.metrics or {}
            if "prefill-queue-duration" in metrics:
                stats.observe_prefill_queue(float(metrics["prefill-queue-duration"]))
            stats.prompt_tokens += len(request.prompt)
            stats.cached_prompt_tokens += int(metrics.get("cached-prompt-tokens") or 0)
        stats.steps += 1  # one vLLM chunk per call
        self._emit([(request, out)])

    def _count(self, reason: str) -> None:
        self.stats.finished[reason] = self.stats.finished.get(reason, 0) + 1

    # ---- weights -------------------------------------------------------------------------------------
    async def _swap(self, swap: WeightSwap) -> None:
        sync = swap.mode == "SYNC"
        error: BaseException | None = None
        try:
            if swap.source_dir is None:
                raise ValueError(f"hot-load of {swap.version!r} has no weights directory for vLLM")
            if sync:  # admission stops; running requests finish on the old weights
                self._admitting.clear()
                await self._idle.wait()

            def flip() -> None:  # before resume: tokens sampled on the new weights carry the new version
                self._policy_version = swap.version

            seconds = await swap_in_place(self.session, self.child.url, swap.source_dir, swap.version, not sync,
                                          flip, lambda: self._last_chunk)
            self.stats.swaps += 1
            self.stats.last_swap_seconds = seconds
        except asyncio.CancelledError:
            error = RuntimeError("the replica is shutting down")
            raise
        except Exception as exc:  # reported to the hot-loader; vLLM keeps serving what it holds
            error = exc
        finally:
            self._admitting.set()
            swap.on_done(error)

    # ---- what the routes add to /health and /metrics -------------------------------------------------
    async def probe(self) -> dict[str, Any] | None:
        """None while the child answers its health check; else the fields of a 503 /health body."""
        ok = self.child.alive()
        if ok:
            try:
                async with self.session.get(f"{self.child.url}/health") as resp:
                    ok = resp.status == 200
            except aiohttp.ClientError:
                ok = False
        return None if ok else {"log_tail": self.child.log_tail()[-1500:]}

    async def vllm_metrics(self) -> str:
        """vLLM's own Prometheus metrics (`vllm:*`), appended to firetitan's."""
        try:
            async with self.session.get(f"{self.child.url}/metrics") as resp:
                return await resp.text()
        except aiohttp.ClientError as exc:
            return f"# vLLM metrics unavailable: {exc}\n"


def vllm_serving(child: VllmChild, *, model_dir: Path, base_model: str, served_name: str, max_model_len: int,
                 scratch: Path) -> Serving:
    """The deployment routes' `Serving` over a started `vllm serve` child."""
    tokenizer = load_tokenizer(model_dir)
    config = model_config(model_dir)
    engines: list[VllmEngine] = []  # the one engine the service builds (the hooks below read it)

    def make_engine(emit: Emit) -> VllmEngine:
        engine = VllmEngine(child, served_name, base_model, max_model_len, emit)
        engines.append(engine)
        return engine

    async def probe() -> dict[str, Any] | None:
        return await engines[0].probe()

    async def extra_metrics() -> str:
        return await engines[0].vllm_metrics()

    return Serving(make_engine, tokenizer, int(config.vocab_size),
                   min(max_model_len, int(config.max_position_embeddings)), marks={"backend": "vllm"},
                   make_loader=lambda store: VllmSnapshotLoader(store, model_dir, scratch),
                   probe=probe, extra_metrics=extra_metrics)
