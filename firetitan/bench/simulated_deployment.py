"""A SIMULATED deployment: the real deployment routes over a queueing-model engine instead of a model.

No model runs here. A continuous-batching server is modelled in simulated ("model") seconds:
requests wait in a FIFO until one of `capacity` decode slots frees (that wait is the reported
`prefill-queue-duration`), prefill costs `prefill_per_token_s` per uncached prompt token, and each
decode step costs `decode_base_s + decode_per_seq_s * running`, so a bigger batch is faster in total
but slower per token. Model time runs `1 / time_scale` times faster than wall time, which lets a
laptop compare concurrency controllers at 2048 requests against a capacity of 128 in seconds.
Every durations it reports (perf_metrics, `fireworks-*` headers) is in model seconds, and every
response says it is a simulation (`"simulation": true`, header `x-firetitan-simulation: 1`).

The HTTP side is the real deployment's (`server/deployment/app.py`: body schema, SSE writer, perf
metrics, bounds), so the wire contract exists once; only the engine behind it (`QueueModelEngine`, an
`EngineBackend`) is simulated. Completion tokens are random ids; logprobs are random.

Faults can be injected per logical request (`x-request-id`): the first attempts answered with a
status (and `Retry-After`), then streams cut before `[DONE]`, plus a random error rate.

Run: `python -m firetitan.bench.simulated_deployment --port 0 --ready-file F --capacity 128`.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from typing import Any

from aiohttp import web

from firetitan.bench.queue_model import (
    _SPECIAL_TOKENS,
    FaultConfig,
    QueueModel,
    SimConfig,
    SimRequest,
    perf_metrics,
)
from firetitan.errors import InvalidRequestError
from firetitan.logging import get_logger
from firetitan.server.deployment.app import DROP_DONE, DeploymentSettings, build_app
from firetitan.server.deployment.backend import Emit, EngineBackend, Serving
from firetitan.server.deployment.engine import EngineRequest, EngineStats, StepOutput, TokenOut
from firetitan.server.deployment.engine.inbox import Abort, InboxEngine, Submit, Swap

__all__ = ["SIM_HEADER", "FaultConfig", "InProcessSimulation", "QueueModel", "QueueModelEngine", "SimConfig",
           "SimTokenizer", "SimulatedDeployment", "perf_metrics"]

log = get_logger("firetitan.bench.simulated_deployment")

SIM_HEADER = "x-firetitan-simulation"


_COMPLETION_PATHS = frozenset({"/inference/v1/completions", "/v1/completions"})


class SimTokenizer:
    """Pseudo tokens for a model-free deployment: text is one id per 4 bytes, id t reads " s<t>"."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [b % (self.vocab_size - _SPECIAL_TOKENS) for b in text.encode()[::4]] or [0]

    def decode(self, ids: list[int], **_kw: Any) -> str:
        return "".join(f" s{t}" for t in ids)


class QueueModelEngine(InboxEngine):
    """An `EngineBackend` that runs a `QueueModel` on its own thread, paced to wall time by `time_scale`.

    It speaks to the routes exactly as the torch engine does (typed inbox messages in, `StepOutput`s
    out through `emit`), so everything above it is the real deployment.
    """

    thread_name = "firetitan-sim-engine"

    def __init__(self, config: SimConfig, emit: Emit) -> None:
        super().__init__()
        self.config = config
        self.model = QueueModel(config)
        self.stats = EngineStats()
        self._emit = emit
        self._by_id: dict[str, SimRequest] = {}  # only to resolve aborts
        self._seed_counter = 0
        self._anchor = time.monotonic()  # wall time of model time 0
        self._tick_start = 0.0  # model time the last tick began (arrivals during it land inside it)

    # ---- EngineBackend ---------------------------------------------------------------------------
    @property
    def policy_version(self) -> str:
        return self.config.policy_version

    @property
    def num_waiting(self) -> int:
        return len(self.model.waiting)

    @property
    def num_running(self) -> int:
        return len(self.model.running)

    @property
    def cached_tokens(self) -> int:
        return sum(r.prompt_len + r.generated for r in list(self.model.running))

    @property
    def reserved_tokens(self) -> int:
        return sum(r.prompt_len + r.max_tokens for r in list(self.model.running))

    @property
    def max_cached_tokens(self) -> int:
        return self.config.capacity * self.config.max_context

    def sim_stats(self) -> dict[str, Any]:
        return self.model.stats()

    # ---- engine thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        m, scale = self.model, self.config.time_scale
        while not self._stopped.is_set():
            if m.idle:
                self._drain_inbox(block=True)
                if m.idle:
                    continue
            else:
                self._drain_inbox(block=False)
            prefill_tokens = m.admit()
            for r in m.running:
                if r.admit_vt == m.vt and r.owner is not None and r.generated == 0:
                    self.stats.observe_prefill_queue(m.vt - r.arrival_vt)
                    self.stats.prompt_tokens += r.prompt_len
                    self.stats.cached_prompt_tokens += r.cached
            if not m.running:
                continue
            dt = m.tick_duration(prefill_tokens)
            self._tick_start = m.vt
            # Pace to wall time; if this process falls behind, model time simply runs slower.
            time.sleep(max(0.0, self._anchor + (m.vt + dt) * scale - time.monotonic()))
            outputs = [self._output(r) for r in m.advance(dt) if r.owner is not None]
            self.stats.steps += 1
            produced = sum(len(out.tokens) for _, out in outputs)
            self.stats.generated_tokens += produced
            self.stats.recent.append((time.monotonic(), produced))
            if outputs:
                self._emit(outputs)

    def _handle(self, message: Submit | Abort | Swap) -> None:
        m, scale = self.model, self.config.time_scale
        match message:
            case Submit(request):
                if m.idle:  # idle wall time passes in model time too; model time never runs backwards
                    m.vt = max(m.vt, (time.monotonic() - self._anchor) / scale)
                    self._anchor = time.monotonic() - m.vt * scale
                    self._tick_start = m.vt
                self._seed_counter += 1
                seed = request.options.seed
                if seed is None:
                    seed = self.config.faults.seed * 1_000_003 + self._seed_counter
                sim = m.submit(request.prompt, request.options.max_tokens, seed)
                # The reported wait is the wait for a slot: one that finds a slot free is admitted at this
                # step boundary without waiting; otherwise it arrived part-way through the tick that ran.
                if len(m.running) + len(m.waiting) > self.config.capacity:
                    sim.arrival_vt = min(m.vt, max(self._tick_start, (request.arrival - self._anchor) / scale))
                sim.owner = request
                request.concurrent_at_arrival = len(m.waiting) + len(m.running) - 1
                self._by_id[request.request_id] = sim
            case Abort(request_id):
                sim = self._by_id.pop(request_id, None)
                if sim is not None and sim.owner is not None:
                    sim.cancelled = True
                    self._count("abort")
                    self._emit([(sim.owner, StepOutput([], "", "abort", perf_metrics(sim, self.config)))])
            case Swap(swap):
                swap.on_done(RuntimeError("a simulated deployment has no weights to swap"))

    def _output(self, sim: SimRequest) -> tuple[EngineRequest, StepOutput]:
        request = sim.owner
        assert request is not None
        opts = request.options
        count = sim.generated - sim.sent
        first = sim.sent == 0
        sim.sent = sim.generated
        temp = max(opts.temperature, 1e-3)
        tokens = []
        for _ in range(count):
            token = sim.rng.randrange(self.config.vocab_size - _SPECIAL_TOKENS)
            lp = round(-sim.rng.expovariate(1.0) - 1e-3, 6)
            top = [(token, lp)] * min(1, opts.top_logprobs) if opts.top_logprobs else None
            tokens.append(TokenOut(token, lp, round(lp / temp, 6), self.config.policy_version, top))
        out = StepOutput(tokens, "".join(f" s{t.token_id}" for t in tokens))
        if sim.done_vt is not None:
            out.finish_reason = sim.finish_reason
            self._by_id.pop(request.request_id, None)
            self._count(sim.finish_reason)
        if first or out.finish_reason is not None:
            out.metrics = perf_metrics(sim, self.config)
        return request, out

    def _count(self, reason: str) -> None:
        self.stats.finished[reason] = self.stats.finished.get(reason, 0) + 1


class SimulatedDeployment:
    """The real deployment app over a `QueueModelEngine`, plus fault injection and `/sim/*` admin routes."""

    def __init__(self, config: SimConfig | None = None, api_key: str | None = None) -> None:
        self.config = config or SimConfig()
        self.attempts: dict[str, list[float]] = {}
        self.outcomes: dict[str, int] = {"ok": 0, "injected_status": 0, "injected_truncation": 0,
                                         "client_disconnects": 0}
        self._fault_rng = random.Random(self.config.faults.seed)
        cfg = self.config
        settings = DeploymentSettings(base_model="simulated", deployment_id="simulated",
                                      max_running_seqs=cfg.capacity, max_cached_tokens=cfg.max_context,
                                      api_key=api_key, max_waiting_requests=1 << 20)

        def make_engine(emit: Emit) -> EngineBackend:
            return QueueModelEngine(self.config, emit)

        serving = Serving(make_engine, SimTokenizer(cfg.vocab_size), cfg.vocab_size, cfg.max_context,
                          marks={"simulation": True})
        self.app = build_app(settings, serving)
        # Outside the route's own client-gone handling, so a dropped client is seen here as a 499.
        self.app.middlewares.insert(len(self.app.middlewares) - 1, self._faults)
        self.app.on_response_prepare.append(self._mark)
        self.app.router.add_get("/sim/stats", self._stats)
        self.app.router.add_post("/sim/config", self._set_config)

    @property
    def engine(self) -> QueueModelEngine:
        return self.app["service"].engine  # type: ignore[no-any-return]

    async def _mark(self, _request: web.Request, response: web.StreamResponse) -> None:
        response.headers[SIM_HEADER] = "1"

    async def _stats(self, request: web.Request) -> web.Response:
        body = {**self.engine.sim_stats(), "outcomes": dict(self.outcomes),
                "attempts": {k: len(v) for k, v in self.attempts.items()},
                "attempt_times_s": {k: v for k, v in self.attempts.items()}}
        return web.json_response(body)

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

    def _inject(self, request_id: str) -> str | None:
        """This attempt's fate from the fault config: None, 'status' or 'truncate'."""
        times = self.attempts.setdefault(request_id, [])
        times.append(asyncio.get_running_loop().time())
        idx = len(times) - 1
        f = self.config.faults
        if idx < f.fail_attempts:
            return "status"
        if idx < f.fail_attempts + f.truncate_attempts:
            return "truncate"
        if f.error_rate and self._fault_rng.random() < f.error_rate:
            return "status"
        return None

    @web.middleware
    async def _faults(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if request.method != "POST" or request.path not in _COMPLETION_PATHS:
            return await handler(request)  # type: ignore[no-any-return]
        fate = self._inject(request.headers.get("x-request-id") or f"anon-{id(request)}")
        if fate == "status":
            self.outcomes["injected_status"] += 1
            status = self.config.faults.fail_status
            headers = {}
            if self.config.faults.retry_after_s is not None:
                headers["Retry-After"] = f"{self.config.faults.retry_after_s:g}"
            return web.json_response(
                {"error": {"type": "SimulatedFault", "message": f"injected HTTP {status} (simulation)",
                           "field": None}}, status=status, headers=headers)
        if fate == "truncate":
            request[DROP_DONE] = True
        response: web.StreamResponse = await handler(request)
        if response.status == 499:
            self.outcomes["client_disconnects"] += 1
        elif response.status == 200:
            self.outcomes["injected_truncation" if fate == "truncate" else "ok"] += 1
        return response


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
