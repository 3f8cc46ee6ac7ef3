"""Discrete-event run of a concurrency controller against the simulation's queueing model, in model time.

Same `QueueModel` and the same controller objects (real `acquire`/`release` with `ServerMetrics`) as the
HTTP simulation, but the clock is virtual and there is no HTTP, so 2048-request steps against a
capacity of 128 run in seconds, deterministically, whatever else this machine is doing.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

from firetitan.bench.harness import summarize
from firetitan.bench.load import RLLoad, step_groups
from firetitan.bench.queue_model import QueueModel, SimConfig, SimRequest, perf_metrics
from firetitan.client.concurrency import ConcurrencyController
from firetitan.client.server_metrics import parse_server_metrics

# Event-loop turns without any progress after which the client side is considered quiescent.
_QUIET_TURNS = 3


async def run_des(config: SimConfig, load: RLLoad, controller: ConcurrencyController, *, label: str = "",
                  capacity_schedule: dict[int, int] | None = None) -> dict[str, Any]:
    """Run `load` under `controller`; `capacity_schedule` {step: capacity} changes the server mid-run."""
    model = QueueModel(config.model_copy(deep=True))
    progress = 0
    pq: list[float] = []
    ttft: list[float] = []
    tokens = 0
    series: list[dict[str, float]] = []
    steps: list[dict[str, Any]] = []
    seeds = iter(range(1, 1 << 62))
    finished: dict[SimRequest, asyncio.Event] = {}  # set when the request's last token is out

    async def one(prompt: list[int], max_tokens: int) -> None:
        nonlocal progress, tokens
        await controller.acquire()
        progress += 1
        req = model.submit(prompt, max_tokens, next(seeds))
        done = finished[req] = asyncio.Event()
        try:
            await done.wait()
        finally:
            perf = perf_metrics(req, model.config)
            metrics = parse_server_metrics(None, perf, completion_tokens=req.generated)
            pq.append(perf["prefill-queue-duration"])
            ttft.append(perf["server-time-to-first-token"])
            tokens += req.generated
            progress += 1
            controller.release(metrics)

    async def settle() -> None:
        quiet, last = 0, -1
        while quiet < _QUIET_TURNS:
            await asyncio.sleep(0)
            quiet = quiet + 1 if progress == last else 0
            last = progress

    t_start = model.vt
    for step in range(load.steps):
        if capacity_schedule and step in capacity_schedule:
            model.config.capacity = capacity_schedule[step]
        step_t0, step_tokens0 = model.vt, tokens
        tasks = [asyncio.create_task(one(g.prompt, mt)) for g in step_groups(load, step) for mt in g.max_tokens]
        while not all(t.done() for t in tasks):
            await settle()
            if model.idle:
                continue
            prefill = model.admit()
            dt = model.tick_duration(prefill)
            for r in model.advance(dt):
                if r.done_vt is not None:
                    finished.pop(r).set()
            series.append({"t": model.vt - t_start, "window": controller.window_size,
                           "in_flight": controller.in_flight, "running": len(model.running)})
        await asyncio.gather(*tasks)
        summary = controller.step_completed()
        dur = model.vt - step_t0
        steps.append({"step": step, "sim_s": dur, "output_tokens": tokens - step_tokens0,
                      "output_tokens_per_sim_s": (tokens - step_tokens0) / dur if dur else 0.0,
                      "capacity": model.config.capacity, "controller": summary})
    total = model.vt - t_start
    # Keep plots and JSON small: about 400 points of the window series.
    stride = max(1, len(series) // 400)
    return {
        "label": label or repr(controller),
        "controller": repr(controller),
        "mode": "discrete-event simulation (model time)",
        "sim_config": config.model_dump(),
        "load": dataclasses.asdict(load),
        "capacity_schedule": capacity_schedule or {},
        "requests": len(pq),
        "output_tokens": tokens,
        "sim_time_s": total,
        "output_tokens_per_sim_s": tokens / total if total else 0.0,
        "requests_per_sim_s": len(pq) / total if total else 0.0,
        "prefill_queue_s": summarize(pq),
        "server_ttft_s": summarize(ttft),
        "steps": steps,
        "window_series": series[::stride],
        "adjustments": list(getattr(controller, "history", [])),
    }
