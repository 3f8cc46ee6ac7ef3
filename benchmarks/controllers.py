"""Compare concurrency controllers: fixed windows vs firetitan's adaptive controller vs the hosted SDK's rule.

Modes (all write JSON + PNG under benchmarks/results/):
  default   discrete-event run on the simulation's queueing model, at scale (2048 requests per RL step
            against a capacity of 128), in model time -> controllers_sim.json
  --http    the same comparison through the full stack (DeploymentSampler, SSE, the simulated
            deployment as a subprocess) at a smaller scale, in wall time -> controllers_sim_http.json
  --real    the real deployment worker on firetitan/tiny-qwen3, kept small -> controllers_real.json

    .venv/bin/python benchmarks/controllers.py [--http] [--real]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.baselines.hosted_aimd import HostedAIMDController  # noqa: E402
from firetitan.bench.des import run_des  # noqa: E402
from firetitan.bench.harness import BenchOptions, run_benchmark  # noqa: E402
from firetitan.bench.load import RLLoad  # noqa: E402
from firetitan.bench.plot import plot_comparison  # noqa: E402
from firetitan.bench.runner import make_controller, start_simulation  # noqa: E402
from firetitan.bench.simulated_deployment import SimConfig  # noqa: E402
from firetitan.client.concurrency import AdaptiveConcurrencyController, ConcurrencyController  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
TARGET = 0.5


def controller_for(spec: str, initial: int, interval: int = 32) -> ConcurrencyController:
    if spec == "hosted":
        return HostedAIMDController(initial_window=initial, prefill_queue_target=TARGET,
                                    adjustment_interval=interval)
    if spec == "adaptive":
        return AdaptiveConcurrencyController(initial_window=initial, prefill_queue_target=TARGET,
                                             adjustment_interval=interval)
    return make_controller(spec)


def settle_intervals(adjustments: list[dict[str, Any]], band: float = 0.15) -> int | None:
    """Adjustments until the window enters, and stays in, ±band of its median over the last third."""
    if not adjustments:
        return None
    after = [a["after"] for a in adjustments]
    final = statistics.median(after[len(after) * 2 // 3:])
    for i in range(len(after)):
        if all(abs(x - final) <= band * final for x in after[i:]):
            return i + 1
    return None


def _adjustments_from_step(run: dict[str, Any], step: int) -> list[dict[str, Any]]:
    start = int(sum(s["controller"].get("adjustments", 0) for s in run["steps"][:step]))
    return (run.get("adjustments") or [])[start:]


def verdict(results: list[dict[str, Any]], key: str, change_step: int | None = None) -> dict[str, Any]:
    fixed = [r for r in results if r["label"].startswith("fixed")]
    best = max(fixed, key=lambda r: r[key])
    adaptive = next(r for r in results if r["label"] == "adaptive")
    hosted = next(r for r in results if r["label"] == "hosted")
    pq95 = adaptive["prefill_queue_s"]["p95"]
    out = {
        "throughput_key": key,
        "best_fixed": best["label"],
        "best_fixed_throughput": best[key],
        "adaptive_throughput": adaptive[key],
        "hosted_throughput": hosted[key],
        "adaptive_vs_best_fixed": adaptive[key] / best[key],
        "hosted_vs_best_fixed": hosted[key] / best[key],
        "adaptive_vs_hosted": adaptive[key] / hosted[key] if hosted[key] else None,
        "adaptive_pq_p95_s": pq95,
        "hosted_pq_p95_s": hosted["prefill_queue_s"]["p95"],
        "best_fixed_pq_p95_s": best["prefill_queue_s"]["p95"],
        "prefill_queue_target_s": TARGET,
        "adaptive_adjustment_intervals_to_settle": settle_intervals(adaptive.get("adjustments") or []),
        "hosted_adjustment_intervals_to_settle": settle_intervals(hosted.get("adjustments") or []),
    }
    if change_step is not None:
        out["adaptive_adjustment_intervals_to_settle_after_change"] = settle_intervals(
            _adjustments_from_step(adaptive, change_step))
    out["goal_met"] = bool(out["adaptive_vs_best_fixed"] >= 0.9 and pq95 is not None and pq95 <= TARGET
                           and adaptive[key] > hosted[key])
    return out


def _slim(r: dict[str, Any]) -> dict[str, Any]:
    r = dict(r)
    r["adjustments"] = [{k: v for k, v in a.items() if k != "t"} for a in r.get("adjustments", [])]
    return r


def _print_table(results: list[dict[str, Any]], key: str) -> None:
    for r in results:
        pq = r["prefill_queue_s"]
        print(f"  {r['label']:<10} {key}={r[key]:9.1f}  pq p50={pq['p50'] or 0:.3f} p95={pq['p95'] or 0:.3f} "
              f"p99={pq['p99'] or 0:.3f}")


async def des_mode(args: argparse.Namespace) -> dict[str, Any]:
    config = SimConfig(capacity=args.capacity)
    load = RLLoad(steps=args.steps, groups=args.groups, samples_per_group=args.samples)
    specs = [f"fixed:{w}" for w in args.fixed] + ["adaptive", "hosted"]
    scenarios: dict[str, dict[int, int] | None] = {
        "steady": None,
        # Halfway through, the server halves its capacity (other tenants, a bigger model): who follows?
        "capacity_halved": {args.steps // 2: args.capacity // 2},
    }
    out: dict[str, Any] = {"mode": "discrete-event simulation", "sim_config": config.model_dump(),
                           "load": vars(load) if hasattr(load, "__dict__") else {}, "scenarios": {}}
    for name, schedule in scenarios.items():
        results = []
        for spec in specs:
            t0 = time.monotonic()
            r = await run_des(config, load, controller_for(spec, args.initial_window), label=spec.replace(":", "-"),
                              capacity_schedule=schedule)
            r["label"] = spec.replace(":", "-")
            r["cpu_wall_s"] = time.monotonic() - t0
            results.append(_slim(r))
        print(f"[{name}] capacity={args.capacity} requests/step={load.requests_per_step} steps={load.steps}")
        _print_table(results, "output_tokens_per_sim_s")
        v = verdict(results, "output_tokens_per_sim_s", next(iter(schedule)) if schedule else None)
        print(f"  verdict: {json.dumps(v)}")
        out["scenarios"][name] = {"capacity_schedule": schedule or {}, "verdict": v, "runs": results}
        plot_comparison(results, RESULTS / f"controllers_sim_{name}.png", throughput_key="output_tokens_per_sim_s",
                        title=f"simulation ({name})", time_label="model time (s)")
    return out


async def http_mode(args: argparse.Namespace) -> dict[str, Any]:
    config = SimConfig(capacity=args.http_capacity, time_scale=args.time_scale)
    load = RLLoad(steps=3, groups=args.http_groups, samples_per_group=8, max_tokens_median=96,
                  max_tokens_max=512)
    specs = [f"fixed:{w}" for w in args.http_fixed] + ["adaptive", "hosted"]
    results = []
    for spec in specs:
        worker = start_simulation(config)  # fresh per run: the prefix cache must not carry over
        try:
            r = await run_benchmark(BenchOptions(worker.url, progress=False, label=spec.replace(":", "-")), load,
                                    controller_for(spec, args.initial_window))
        finally:
            worker.stop()
        r["label"] = spec.replace(":", "-")
        results.append(_slim(r))
    print(f"[http] capacity={config.capacity} time_scale={config.time_scale} requests/step={load.requests_per_step}")
    _print_table(results, "output_tokens_per_sim_s")
    v = verdict(results, "output_tokens_per_sim_s")
    print(f"  verdict: {json.dumps(v)}")
    plot_comparison(results, RESULTS / "controllers_sim_http.png", throughput_key="output_tokens_per_sim_s",
                    title="simulated deployment over HTTP")
    return {"mode": "simulated deployment over HTTP", "sim_config": config.model_dump(), "verdict": v,
            "runs": results}


async def real_mode(args: argparse.Namespace) -> dict[str, Any]:
    from firetitan.server.process import spawn_worker

    load = RLLoad(steps=args.real_steps, groups=args.real_groups, samples_per_group=4, prompt_len_min=16, prompt_len_max=64,
                  max_tokens_median=24, max_tokens_max=64, token_id_low=100, token_id_high=3000)
    specs = [f"fixed:{w}" for w in args.real_fixed] + ["adaptive", "hosted"]
    results = []
    with tempfile.TemporaryDirectory(prefix="firetitan-bench-") as store:
        # One worker for every controller: starting torch costs more than a run on this machine, and the
        # worker keeps no state between requests that would favour a later run.
        worker = spawn_worker("firetitan.server.deployment",
                              ["--store-dir", store, "--base-model", args.real_model, "--deployment-id", "bench",
                               "--max-running-seqs", str(args.real_capacity)], ready_timeout=600, threads=2)
        try:
            rounds: dict[str, list[dict[str, Any]]] = {spec: [] for spec in specs}
            # Interleave repeats (A B C A B C): this machine's CPUs are shared, so load drifts over minutes.
            for rep in range(args.real_repeats):
                for spec in specs if rep % 2 == 0 else list(reversed(specs)):
                    r = await run_benchmark(BenchOptions(worker.url, progress=False, label=spec.replace(":", "-")),
                                            load, controller_for(spec, args.real_initial, args.real_interval))
                    r["load_average_1m"] = os.getloadavg()[0]
                    rounds[spec].append(r)
        finally:
            worker.stop()
    for spec in specs:
        runs = sorted(rounds[spec], key=lambda r: r["output_tokens_per_s"])
        r = dict(runs[len(runs) // 2])  # the median run (upper median for an even count)
        r["label"] = spec.replace(":", "-")
        r["repeats_output_tokens_per_s"] = [x["output_tokens_per_s"] for x in rounds[spec]]
        r["repeats_load_average_1m"] = [x["load_average_1m"] for x in rounds[spec]]
        results.append(_slim(r))
    print(f"[real] {args.real_model} requests/step={load.requests_per_step}")
    _print_table(results, "output_tokens_per_s")
    v = verdict(results, "output_tokens_per_s")
    print(f"  verdict: {json.dumps(v)}")
    plot_comparison(results, RESULTS / "controllers_real.png", title=f"real worker ({args.real_model})")
    return {"mode": "real deployment worker", "model": args.real_model, "worker_max_running_seqs": args.real_capacity,
            "adjustment_interval": args.real_interval, "initial_window": args.real_initial, "verdict": v,
            "runs": results}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--capacity", type=int, default=128)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--groups", type=int, default=256)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--initial-window", type=int, default=8)
    p.add_argument("--fixed", type=int, nargs="+", default=[16, 32, 64, 96, 128, 192, 256])
    p.add_argument("--http", action="store_true")
    p.add_argument("--http-capacity", type=int, default=32)
    p.add_argument("--http-groups", type=int, default=64)
    p.add_argument("--http-fixed", type=int, nargs="+", default=[16, 32, 64])
    p.add_argument("--time-scale", type=float, default=0.2)
    p.add_argument("--real", action="store_true")
    p.add_argument("--real-model", default="firetitan/tiny-qwen3")
    p.add_argument("--real-groups", type=int, default=16)
    p.add_argument("--real-steps", type=int, default=4)
    p.add_argument("--real-initial", type=int, default=4)
    p.add_argument("--real-interval", type=int, default=8,
                   help="adjustment_interval for both adaptive rules (a real run here has few requests)")
    p.add_argument("--real-fixed", type=int, nargs="+", default=[4, 16, 32])
    p.add_argument("--real-repeats", type=int, default=3)
    p.add_argument("--real-capacity", type=int, default=16, help="the worker's --max-running-seqs")
    p.add_argument("--skip-des", action="store_true")
    args = p.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    command = "python " + " ".join(sys.argv)
    if not args.skip_des:
        res = asyncio.run(des_mode(args))
        res["command"] = command
        (RESULTS / "controllers_sim.json").write_text(json.dumps(res, indent=1, default=str))
    if args.http:
        res = asyncio.run(http_mode(args))
        res["command"] = command
        (RESULTS / "controllers_sim_http.json").write_text(json.dumps(res, indent=1, default=str))
    if args.real:
        res = asyncio.run(real_mode(args))
        res["command"] = command
        (RESULTS / "controllers_real.json").write_text(json.dumps(res, indent=1, default=str))


if __name__ == "__main__":
    main()
