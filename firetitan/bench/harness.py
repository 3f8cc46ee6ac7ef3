"""The sampling benchmark: drive a deployment URL with RL-shaped load under one controller and measure it."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from typing import Any

import aiohttp

from firetitan.bench.load import RLLoad, step_groups
from firetitan.client.concurrency import ConcurrencyController
from firetitan.client.sampling import ApiStyle, DeploymentSampler, SampledCompletion
from firetitan.client.server_metrics import ServerMetrics
from firetitan.errors import FiretitanError
from firetitan.logging import get_logger
from firetitan.stats import percentile

log = get_logger("firetitan.bench.harness")

WINDOW_SAMPLE_PERIOD_S = 0.05


@dataclasses.dataclass
class BenchOptions:
    url: str
    api: ApiStyle = "fireworks"
    api_key: str | None = None
    model: str = "default"
    http_timeout: float = 600.0
    max_attempts: int = 7
    backoff_base: float = 0.5
    temperature: float = 1.0
    progress: bool = True
    label: str = ""


def summarize(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None, "p99": None, "mean": None, "max": None}
    return {"p50": percentile(values, 0.5), "p95": percentile(values, 0.95), "p99": percentile(values, 0.99),
            "mean": sum(values) / len(values), "max": max(values)}


async def _sim_time(session: aiohttp.ClientSession, url: str) -> float | None:
    """The simulated deployment's model clock, or None for a real server."""
    try:
        async with session.get(url + "/sim/stats", timeout=aiohttp.ClientTimeout(total=10)) as resp:
            if resp.status != 200:
                return None
            return float((await resp.json())["virtual_time_s"])
    except (aiohttp.ClientError, TimeoutError, KeyError, ValueError):
        return None


async def run_benchmark(opts: BenchOptions, load: RLLoad, controller: ConcurrencyController) -> dict[str, Any]:
    """Run `load.steps` RL steps against `opts.url`; returns a JSON-ready result dict."""
    sampler = DeploymentSampler(opts.url, opts.model, opts.api_key, concurrency_controller=controller,
                                http_timeout=opts.http_timeout, max_attempts=opts.max_attempts, api=opts.api,
                                backoff_base=opts.backoff_base, not_ready_delay=1.0)
    series: list[tuple[float, int, int]] = []
    t0 = time.monotonic()
    stop = asyncio.Event()

    async def watch_window() -> None:
        while not stop.is_set():
            series.append((time.monotonic() - t0, controller.window_size, controller.in_flight))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), WINDOW_SAMPLE_PERIOD_S)

    total = load.steps * load.requests_per_step
    progress = _Progress(total, opts.label or type(controller).__name__, enabled=opts.progress)
    steps: list[dict[str, Any]] = []
    completions: list[SampledCompletion] = []
    errors: dict[str, int] = {}
    attempts: list[ServerMetrics] = []
    headers = {"Authorization": f"Bearer {opts.api_key}"} if opts.api_key else {}
    async with aiohttp.ClientSession(headers=headers) as admin:
        vt0 = await _sim_time(admin, opts.url)
        watcher = asyncio.create_task(watch_window())
        try:
            with progress:
                for step in range(load.steps):
                    step_t0 = time.monotonic()

                    async def one(prompt: list[int], max_tokens: int) -> None:
                        try:
                            out = await sampler.sample_with_prompt_tokens(
                                prompt, n=1, max_tokens=max_tokens, temperature=opts.temperature)
                            completions.extend(out)
                        except FiretitanError as exc:
                            kind = getattr(exc, "final_error_kind", None) or type(exc).__name__
                            errors[kind] = errors.get(kind, 0) + 1
                        progress.advance(controller.window_size)

                    async with asyncio.TaskGroup() as tg:
                        for group in step_groups(load, step):
                            for mt in group.max_tokens:
                                tg.create_task(one(group.prompt, mt))
                    summary = controller.step_completed()
                    step_metrics = sampler.drain_metrics()
                    attempts.extend(step_metrics)
                    step_tokens = sum(m.completion_tokens or 0 for m in step_metrics if m.error is None)
                    step_wall = time.monotonic() - step_t0
                    steps.append({"step": step, "wall_s": step_wall, "output_tokens": step_tokens,
                                  "output_tokens_per_s": step_tokens / step_wall if step_wall else 0.0,
                                  "controller": summary})
        finally:
            stop.set()
            await watcher
            await sampler.close()
        wall = time.monotonic() - t0
        vt1 = await _sim_time(admin, opts.url)
    return _report(opts, load, controller, wall, steps, completions, attempts, errors, series,
                   None if vt0 is None or vt1 is None else vt1 - vt0)


def _report(opts: BenchOptions, load: RLLoad, controller: ConcurrencyController, wall: float,
            steps: list[dict[str, Any]], completions: list[SampledCompletion], attempts: list[ServerMetrics],
            errors: dict[str, int], series: list[tuple[float, int, int]], sim_s: float | None) -> dict[str, Any]:
    ok = [m for m in attempts if m.error is None]
    out_tokens = sum(c.completion_len for c in completions)
    pq = [m.prefill_queue_duration for m in ok if m.prefill_queue_duration is not None]
    report: dict[str, Any] = {
        "label": opts.label,
        "url": opts.url,
        "api": opts.api,
        "controller": repr(controller),
        "load": dataclasses.asdict(load),
        "requests": len(completions),
        "failed_requests": sum(errors.values()),
        "errors": errors,
        "attempts": len(attempts),
        "retried_attempts": len(attempts) - len(ok),
        "output_tokens": out_tokens,
        "wall_s": wall,
        "output_tokens_per_s": out_tokens / wall if wall else 0.0,
        "requests_per_s": len(completions) / wall if wall else 0.0,
        "client_ttft_s": summarize([m.client_ttft for m in ok if m.client_ttft is not None]),
        "client_latency_s": summarize([m.client_latency for m in ok if m.client_latency is not None]),
        "server_ttft_s": summarize([m.server_ttft for m in ok if m.server_ttft is not None]),
        "prefill_queue_s": summarize(pq),
        "server_concurrency": summarize([float(m.num_concurrent_requests) for m in ok
                                         if m.num_concurrent_requests is not None]),
        "steps": steps,
        "window_series": [{"t": t, "window": w, "in_flight": f} for t, w, f in series],
        "adjustments": list(getattr(controller, "history", [])),
    }
    if sim_s is not None:
        # On the simulation, model time is what the queueing model spent; wall time adds this machine's noise.
        report["simulation"] = True
        report["sim_time_s"] = sim_s
        report["output_tokens_per_sim_s"] = out_tokens / sim_s if sim_s else 0.0
    return report


class _Progress:
    """A rich progress bar (requests done, current window) that is a no-op when disabled."""

    def __init__(self, total: int, label: str, *, enabled: bool) -> None:
        self.enabled = enabled
        self.total = total
        self.label = label
        self._progress: Any = None
        self._task: Any = None

    def __enter__(self) -> _Progress:
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TimeElapsedColumn(), transient=False)
            self._progress.__enter__()
            self._task = self._progress.add_task(self.label, total=self.total)
        return self

    def advance(self, window: int) -> None:
        if self._progress is not None:
            self._progress.update(self._task, advance=1, description=f"{self.label} window={window}")

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)
