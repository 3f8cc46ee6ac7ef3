"""A SIMULATED deployment: the deployment worker's HTTP API over a queueing model instead of a model.

No model runs here. A continuous-batching server is modelled in simulated ("model") seconds:
requests wait in a FIFO until one of `capacity` decode slots frees (that wait is the reported
`prefill-queue-duration`), prefill costs `prefill_per_token_s` per uncached prompt token, and each
decode step costs `decode_base_s + decode_per_seq_s * running`, so a bigger batch is faster in total
but slower per token. Model time runs `1 / time_scale` times faster than wall time, which lets a
laptop compare concurrency controllers at 2048 requests against a capacity of 128 in seconds.
Every durations it reports (perf_metrics, `fireworks-*` headers) is in model seconds, and every
response says it is a simulation (`"simulation": true`, header `x-firetitan-simulation: 1`).

Faults can be injected per logical request (`x-request-id`): the first attempts answered with a
status (and `Retry-After`), then streams cut before `[DONE]`, plus a random error rate.

Run: `python -m firetitan.bench.simulated_deployment --port 0 --ready-file F --capacity 128`.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import random
from collections import OrderedDict, deque
from typing import Any

import pydantic
from aiohttp import web

from firetitan.errors import InvalidRequestError
from firetitan.logging import get_logger

log = get_logger("firetitan.bench.simulated_deployment")

SIM_HEADER = "x-firetitan-simulation"
PREFIX_CACHE_ENTRIES = 4096
# Reserve the top ids so simulated completions never contain "special" tokens.
_SPECIAL_TOKENS = 16


class FaultConfig(pydantic.BaseModel):
    """Injected failures, counted per `x-request-id` so a retried request sees them in order."""

    model_config = pydantic.ConfigDict(extra="forbid")

    fail_attempts: int = pydantic.Field(0, ge=0)
    fail_status: int = pydantic.Field(503, ge=400, le=599)
    retry_after_s: float | None = pydantic.Field(None, ge=0)
    truncate_attempts: int = pydantic.Field(0, ge=0)
    error_rate: float = pydantic.Field(0.0, ge=0, le=1)
    seed: int = 0


class SimConfig(pydantic.BaseModel):
    """The queueing model. Durations are in model seconds."""

    model_config = pydantic.ConfigDict(extra="forbid")

    capacity: int = pydantic.Field(128, ge=1, description="concurrent decode slots")
    decode_base_s: float = pydantic.Field(0.02, gt=0)
    decode_per_seq_s: float = pydantic.Field(0.0002, ge=0)
    prefill_per_token_s: float = pydantic.Field(0.00002, ge=0)
    time_scale: float = pydantic.Field(0.02, gt=0, description="wall seconds per model second")
    tick_tokens: int = pydantic.Field(4, ge=1, description="decode steps simulated per engine tick")
    stream_every: int = pydantic.Field(0, ge=0, description="emit a chunk every k tokens; 0 = first + rest")
    eos_prob: float = pydantic.Field(0.0, ge=0, lt=1, description="per-token chance of stopping early")
    vocab_size: int = pydantic.Field(4096, ge=32)
    max_context: int = pydantic.Field(32768, ge=8)
    policy_version: str = "simulated-base"
    faults: FaultConfig = pydantic.Field(default_factory=FaultConfig)


class CompletionBody(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="allow")

    model: str = "default"
    prompt: list[int] | str
    max_tokens: int = pydantic.Field(16, ge=1)
    n: int = pydantic.Field(1, ge=1, le=1)
    temperature: float = pydantic.Field(1.0, ge=0)
    stream: bool = False
    logprobs: bool | int | None = None
    raw_output: bool = False
    perf_metrics_in_response: bool = False
    seed: int | None = None
    stream_options: dict[str, Any] | None = None


class _SimRequest:
    __slots__ = (
        "admit_vt",
        "arrival_vt",
        "cached",
        "cancelled",
        "concurrent",
        "done_vt",
        "emitted",
        "finish_reason",
        "first_vt",
        "generated",
        "max_tokens",
        "prompt_len",
        "rng",
        "target_len",
        "wake",
    )

    def __init__(self, prompt_len: int, cached: int, max_tokens: int, rng: random.Random, eos_prob: float,
                 arrival_vt: float) -> None:
        self.prompt_len = prompt_len
        self.cached = cached
        self.max_tokens = max_tokens
        self.rng = rng
        # Early stop drawn up front (geometric), so the engine only counts tokens.
        self.target_len = max_tokens
        if eos_prob > 0:
            length = 1
            while length < max_tokens and rng.random() >= eos_prob:
                length += 1
            self.target_len = length
        self.finish_reason = "length" if self.target_len >= max_tokens else "stop"
        self.arrival_vt = arrival_vt
        self.admit_vt: float | None = None
        self.first_vt: float | None = None
        self.done_vt: float | None = None
        self.generated = 0
        self.emitted: list[int] = []  # every token id sent so far: the final raw_output carries them all
        self.concurrent = 0
        self.cancelled = False
        self.wake: asyncio.Queue[None] = asyncio.Queue()


class QueueModel:
    """The queueing model itself, clock-free: `tick()` advances it by one engine iteration and says how
    long that took in model seconds. Used by the HTTP simulation and by the discrete-event benchmark."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.vt = 0.0  # model seconds
        self.waiting: deque[_SimRequest] = deque()
        self.running: list[_SimRequest] = []
        self.prefix_cache: OrderedDict[str, None] = OrderedDict()
        self.tokens_out = 0
        self.completed = 0
        self.busy_vt = 0.0

    def submit(self, prompt: list[int], max_tokens: int, seed: int) -> _SimRequest:
        key = hashlib.blake2b(json.dumps(prompt[:-1]).encode(), digest_size=12).hexdigest()
        cached = 0
        if len(prompt) > 1 and key in self.prefix_cache:
            self.prefix_cache.move_to_end(key)
            cached = len(prompt) - 1
        else:
            self.prefix_cache[key] = None
            if len(self.prefix_cache) > PREFIX_CACHE_ENTRIES:
                self.prefix_cache.popitem(last=False)
        req = _SimRequest(len(prompt), cached, max_tokens, random.Random(seed), self.config.eos_prob, self.vt)
        self.waiting.append(req)
        return req

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    def admit(self) -> int:
        """Move waiting requests into free slots; returns the prompt tokens to prefill."""
        cfg = self.config
        self.running = [r for r in self.running if not r.cancelled]
        prefill_tokens = 0
        while self.waiting and len(self.running) < cfg.capacity:
            r = self.waiting.popleft()
            if r.cancelled:
                continue
            r.admit_vt = self.vt
            prefill_tokens += r.prompt_len - r.cached
            self.running.append(r)
            r.concurrent = len(self.running)
        return prefill_tokens

    def tick_duration(self, prefill_tokens: int) -> float:
        cfg = self.config
        step = cfg.decode_base_s + cfg.decode_per_seq_s * len(self.running)
        return prefill_tokens * cfg.prefill_per_token_s + cfg.tick_tokens * step

    def advance(self, dt: float) -> list[_SimRequest]:
        """Finish the tick of length `dt` started after `admit()`: emit tokens, return requests that
        progressed (their `wake` queues are signalled by the caller's choice)."""
        cfg = self.config
        step = cfg.decode_base_s + cfg.decode_per_seq_s * len(self.running)
        self.vt += dt
        self.busy_vt += dt
        prefill_end = self.vt - cfg.tick_tokens * step
        progressed: list[_SimRequest] = []
        still: list[_SimRequest] = []
        for r in self.running:
            if r.cancelled:
                continue
            before = r.generated
            r.generated = min(r.target_len, r.generated + cfg.tick_tokens)
            self.tokens_out += r.generated - before
            if r.first_vt is None:
                r.first_vt = prefill_end + step
            if r.generated >= r.target_len:
                r.done_vt = self.vt
                self.completed += 1
                progressed.append(r)
                continue
            if before == 0 or (cfg.stream_every and r.generated // cfg.stream_every != before // cfg.stream_every):
                progressed.append(r)
            still.append(r)
        self.running = still
        return progressed

    def stats(self) -> dict[str, Any]:
        return {"simulation": True, "virtual_time_s": self.vt, "busy_virtual_time_s": self.busy_vt,
                "waiting": len(self.waiting), "running": len(self.running), "tokens_out": self.tokens_out,
                "completed": self.completed, "capacity": self.config.capacity}


def perf_metrics(req: _SimRequest, config: SimConfig) -> dict[str, Any]:
    """The `perf_metrics` of a simulated request, in model seconds."""
    admit = req.admit_vt if req.admit_vt is not None else req.arrival_vt
    first = req.first_vt if req.first_vt is not None else admit
    done = req.done_vt if req.done_vt is not None else first
    prefill = (req.prompt_len - req.cached) * config.prefill_per_token_s
    return {"prefill-queue-duration": round(admit - req.arrival_vt, 6),
            "prefill-duration": round(prefill, 6),
            "generation-queue-duration": 0.0,
            "server-time-to-first-token": round(first - req.arrival_vt, 6),
            "server-processing-time": round(done - req.arrival_vt, 6),
            "num-concurrent-requests": req.concurrent,
            "prompt-tokens": req.prompt_len,
            "cached-prompt-tokens": req.cached,
            "deployment": "simulated",
            "simulation": True}


class SimEngine:
    """Runs a `QueueModel` in real time (scaled by `time_scale`) as one asyncio task."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.model = QueueModel(config)
        self._kick = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._anchor: float | None = None  # wall time of model time 0
        self._tick_end = 0.0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="sim-engine")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    def submit(self, prompt: list[int], max_tokens: int, seed: int) -> _SimRequest:
        was_idle = self.model.idle
        req = self.model.submit(prompt, max_tokens, seed)
        if self._anchor is not None and not was_idle:
            # Arrivals during a tick happen part-way through it in model time, not at its start.
            now_vt = (asyncio.get_running_loop().time() - self._anchor) / self.config.time_scale
            req.arrival_vt = min(max(self.model.vt, now_vt), self._tick_end)
        self._kick.set()
        return req

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        m, cfg = self.model, self.config
        anchor = loop.time() - m.vt * cfg.time_scale
        self._anchor = anchor
        while True:
            if m.idle:
                self._kick.clear()
                await self._kick.wait()
                # Idle wall time passes in model time too; model time never runs backwards.
                m.vt = max(m.vt, (loop.time() - anchor) / cfg.time_scale)
                anchor = loop.time() - m.vt * cfg.time_scale
                self._anchor = anchor
                for r in m.waiting:
                    r.arrival_vt = m.vt
            prefill_tokens = m.admit()
            if not m.running:
                continue
            dt = m.tick_duration(prefill_tokens)
            self._tick_end = m.vt + dt
            # Pace to wall time; if this process falls behind, model time simply runs slower.
            delay = anchor + (m.vt + dt) * cfg.time_scale - loop.time()
            await asyncio.sleep(max(0.0, delay))
            for r in m.advance(dt):
                r.wake.put_nowait(None)

    def stats(self) -> dict[str, Any]:
        return self.model.stats()


class SimulatedDeployment:
    """The aiohttp application around a `SimEngine`, speaking the deployment worker's routes."""

    def __init__(self, config: SimConfig | None = None, api_key: str | None = None) -> None:
        from firetitan.server.common import make_app

        self.config = config or SimConfig()
        self.engine: SimEngine | None = None
        self.attempts: dict[str, list[float]] = {}
        self.outcomes: dict[str, int] = {"ok": 0, "injected_status": 0, "injected_truncation": 0,
                                         "client_disconnects": 0}
        self._fault_rng = random.Random(self.config.faults.seed)
        self._seed_counter = 0
        self.app = make_app(api_key)
        self.app.router.add_post("/inference/v1/completions", self._fireworks)
        self.app.router.add_post("/v1/completions", self._openai)
        self.app.router.add_get("/health", self._health)
        self.app.router.add_get("/metrics", self._metrics)
        self.app.router.add_get("/sim/stats", self._stats)
        self.app.router.add_post("/sim/config", self._set_config)
        self.app.on_startup.append(self._on_startup)
        self.app.on_cleanup.append(self._on_cleanup)

    async def _on_startup(self, app: web.Application) -> None:
        self.engine = SimEngine(self.config)
        self.engine.start()

    async def _on_cleanup(self, app: web.Application) -> None:
        if self.engine is not None:
            await self.engine.stop()

    # ------------------------------------------------------------------ admin routes

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "simulation": True}, headers={SIM_HEADER: "1"})

    async def _stats(self, request: web.Request) -> web.Response:
        assert self.engine is not None
        body = {**self.engine.stats(), "outcomes": dict(self.outcomes),
                "attempts": {k: len(v) for k, v in self.attempts.items()},
                "attempt_times_s": {k: v for k, v in self.attempts.items()}}
        return web.json_response(body, headers={SIM_HEADER: "1"})

    async def _set_config(self, request: web.Request) -> web.Response:
        """Replace the fault config (and optionally capacity) of a running simulation."""
        raw = await request.json()
        if "faults" in raw:
            self.config.faults = FaultConfig.model_validate(raw["faults"])
            self._fault_rng = random.Random(self.config.faults.seed)
        if "capacity" in raw:
            cap = int(raw["capacity"])
            if cap < 1:
                raise InvalidRequestError(f"capacity must be >= 1, got {cap}", field="capacity")
            self.config.capacity = cap
        if raw.get("reset_attempts"):
            self.attempts.clear()
        return web.json_response({"config": self.config.model_dump(), "simulation": True})

    async def _metrics(self, request: web.Request) -> web.Response:
        assert self.engine is not None
        s = self.engine.stats()
        text = (
            "# HELP firetitan_sim_requests_waiting Requests waiting for a decode slot (SIMULATION).\n"
            "# TYPE firetitan_sim_requests_waiting gauge\n"
            f"firetitan_sim_requests_waiting {s['waiting']}\n"
            "# TYPE firetitan_sim_requests_running gauge\n"
            f"firetitan_sim_requests_running {s['running']}\n"
            "# TYPE firetitan_sim_generated_tokens_total counter\n"
            f"firetitan_sim_generated_tokens_total {s['tokens_out']}\n"
            "# TYPE firetitan_sim_virtual_time_seconds counter\n"
            f"firetitan_sim_virtual_time_seconds {s['virtual_time_s']}\n")
        return web.Response(text=text, content_type="text/plain", headers={SIM_HEADER: "1"})

    # ------------------------------------------------------------------ completions

    async def _fireworks(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, openai=False)

    async def _openai(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, openai=True)

    def _tokens(self, body: CompletionBody) -> list[int]:
        if isinstance(body.prompt, str):
            # Text prompts (OpenAI clients): one pseudo-token per 4 bytes, enough for a queueing model.
            raw = body.prompt.encode()
            return [b % (self.config.vocab_size - _SPECIAL_TOKENS) for b in raw[::4]] or [0]
        if not body.prompt:
            raise InvalidRequestError("prompt must not be empty", field="prompt")
        bad = [t for t in body.prompt if not 0 <= t < self.config.vocab_size]
        if bad:
            raise InvalidRequestError(f"prompt token ids must be in [0, {self.config.vocab_size}), got {bad[0]}",
                                      field="prompt")
        return body.prompt

    def _inject(self, request_id: str) -> tuple[str | None, int]:
        """Decide this attempt's fate from the fault config: (None|'status'|'truncate', attempt index)."""
        loop = asyncio.get_running_loop()
        times = self.attempts.setdefault(request_id, [])
        times.append(loop.time())
        idx = len(times) - 1
        f = self.config.faults
        if idx < f.fail_attempts:
            return "status", idx
        if idx < f.fail_attempts + f.truncate_attempts:
            return "truncate", idx
        if f.error_rate and self._fault_rng.random() < f.error_rate:
            return "status", idx
        return None, idx

    async def _complete(self, request: web.Request, *, openai: bool) -> web.StreamResponse:
        from firetitan.server.common import parse_body

        body = await parse_body(request, CompletionBody)
        prompt = self._tokens(body)
        if len(prompt) + body.max_tokens > self.config.max_context:
            raise InvalidRequestError(
                f"prompt ({len(prompt)} tokens) + max_tokens ({body.max_tokens}) exceeds the simulated "
                f"context of {self.config.max_context}", field="max_tokens")
        request_id = request.headers.get("x-request-id") or f"anon-{id(request)}"
        fate, _ = self._inject(request_id)
        if fate == "status":
            self.outcomes["injected_status"] += 1
            headers = {SIM_HEADER: "1"}
            if self.config.faults.retry_after_s is not None:
                headers["Retry-After"] = f"{self.config.faults.retry_after_s:g}"
            status = self.config.faults.fail_status
            return web.json_response(
                {"error": {"type": "SimulatedFault", "message": f"injected HTTP {status} (simulation)",
                           "field": None}}, status=status, headers=headers)
        assert self.engine is not None
        self._seed_counter += 1
        seed = body.seed if body.seed is not None else self.config.faults.seed * 1_000_003 + self._seed_counter
        req = self.engine.submit(prompt, body.max_tokens, seed)
        try:
            if body.stream:
                return await self._stream(request, body, req, openai=openai, truncate=fate == "truncate")
            await self._wait_done(req)
            return self._whole(body, req, openai=openai)
        except (asyncio.CancelledError, ConnectionResetError):
            req.cancelled = True
            self.outcomes["client_disconnects"] += 1
            raise

    async def _wait_done(self, req: _SimRequest) -> None:
        while req.done_vt is None:
            await req.wake.get()

    def _perf(self, req: _SimRequest) -> dict[str, Any]:
        return perf_metrics(req, self.config)

    def _emit(self, req: _SimRequest, start: int, end: int, body: CompletionBody, *,
              openai: bool) -> dict[str, Any]:
        ids = [req.rng.randrange(self.config.vocab_size - _SPECIAL_TOKENS) for _ in range(end - start)]
        req.emitted.extend(ids)
        choice: dict[str, Any] = {"index": 0, "text": "".join(f" s{t}" for t in ids), "finish_reason": None}
        if body.logprobs:
            temp = max(body.temperature, 1e-3)
            content = []
            for t in ids:
                lp = -req.rng.expovariate(1.0) - 1e-3
                content.append({"token_id": t, "token": f" s{t}", "logprob": round(lp, 6),
                                "sampling_logprob": round(lp / temp, 6)})
            choice["logprobs"] = {"content": content}
        return {"id": "sim", "object": "text_completion", "model": body.model, "choices": [choice]}

    def _final_fields(self, chunk: dict[str, Any], body: CompletionBody, req: _SimRequest, *, openai: bool) -> None:
        chunk["choices"][0]["finish_reason"] = req.finish_reason
        if not openai or body.raw_output:  # complete, in the choice's final chunk only (the wire contract)
            chunk["choices"][0]["raw_output"] = {"completion_token_ids": list(req.emitted),
                                                 "policy_versions": [self.config.policy_version] * len(req.emitted)}
        chunk["choices"][0]["policy_version"] = self.config.policy_version
        chunk["usage"] = {"prompt_tokens": req.prompt_len, "completion_tokens": req.generated,
                          "total_tokens": req.prompt_len + req.generated}
        if body.perf_metrics_in_response:
            chunk["perf_metrics"] = self._perf(req)

    def _whole(self, body: CompletionBody, req: _SimRequest, *, openai: bool) -> web.Response:
        chunk = self._emit(req, 0, req.generated, body, openai=openai)
        self._final_fields(chunk, body, req, openai=openai)
        chunk["simulation"] = True
        headers = {SIM_HEADER: "1", **{f"fireworks-{k}": str(v) for k, v in self._perf(req).items()
                                      if k not in ("simulation",)}}
        self.outcomes["ok"] += 1
        return web.json_response(chunk, headers=headers)

    async def _stream(self, request: web.Request, body: CompletionBody, req: _SimRequest, *, openai: bool,
                      truncate: bool) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           SIM_HEADER: "1"})
        await resp.prepare(request)
        sent = 0
        while True:
            await req.wake.get()
            upto = req.generated
            if req.done_vt is not None:
                chunk = self._emit(req, sent, upto, body, openai=openai)
                if truncate:
                    # Cut the stream before the final chunk and [DONE]: the client must retry.
                    self.outcomes["injected_truncation"] += 1
                    await resp.write(_sse(chunk))
                    return resp
                self._final_fields(chunk, body, req, openai=openai)
                chunk["simulation"] = True
                await resp.write(_sse(chunk))
                await resp.write(b"data: [DONE]\n\n")
                self.outcomes["ok"] += 1
                await resp.write_eof()
                return resp
            if upto > sent:
                await resp.write(_sse(self._emit(req, sent, upto, body, openai=openai)))
                sent = upto


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


class InProcessSimulation:
    """Runs a `SimulatedDeployment` on loopback inside the current event loop (tests, small benches)."""

    def __init__(self, config: SimConfig | None = None, api_key: str | None = None) -> None:
        self.sim = SimulatedDeployment(config, api_key=api_key)
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def __aenter__(self) -> InProcessSimulation:
        self._runner = web.AppRunner(self.sim.app, handle_signals=False, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from firetitan.server.common import add_common_args

    p = argparse.ArgumentParser(prog="python -m firetitan.bench.simulated_deployment",
                                description="A SIMULATED deployment (queueing model, no model) for benchmarks.")
    add_common_args(p)
    p.add_argument("--config-json", default=None, help="a SimConfig as JSON (overrides the flags below)")
    p.add_argument("--capacity", type=int, default=128)
    p.add_argument("--time-scale", type=float, default=0.02)
    p.add_argument("--decode-base-s", type=float, default=0.02)
    p.add_argument("--decode-per-seq-s", type=float, default=0.0002)
    p.add_argument("--prefill-per-token-s", type=float, default=0.00002)
    p.add_argument("--tick-tokens", type=int, default=4)
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> SimConfig:
    if args.config_json:
        return SimConfig.model_validate_json(args.config_json)
    return SimConfig(capacity=args.capacity, time_scale=args.time_scale, decode_base_s=args.decode_base_s,
                     decode_per_seq_s=args.decode_per_seq_s, prefill_per_token_s=args.prefill_per_token_s,
                     tick_tokens=args.tick_tokens)


def main(argv: list[str] | None = None) -> None:
    from firetitan.logging import configure_logging
    from firetitan.server.common import serve_app

    args = parse_args(argv)
    configure_logging(args.log_level, capture_stdlib=True)
    sim = SimulatedDeployment(config_from_args(args), api_key=args.api_key)
    log.info("simulated_deployment_starting", config=sim.config.model_dump())
    asyncio.run(serve_app(sim.app, args.host, args.port, args.ready_file, extra_ready={"simulation": True}))


if __name__ == "__main__":
    main()
