"""Compare concurrency controllers: fixed windows vs firetitan's adaptive controller vs the official SDK's.

Modes (all write JSON + PNG under benchmarks/results/):
  default   discrete-event run on the simulation's queueing model, at scale (2048 requests per RL step
            against a capacity of 128), in model time -> controllers_sim.json
  --http    the same comparison through the full stack (DeploymentSampler, SSE, the simulated
            deployment as a subprocess) at a smaller scale, in wall time -> controllers_sim_http.json
  --real    the real deployment worker on firetitan/tiny-qwen3, kept small -> controllers_real.json
  --official  the baseline: the official `fireworks.training.sdk` AdaptiveConcurrencyController driven
            through the official DeploymentSampler, next to firetitan's sampler + controllers, against
            one real deployment worker with an RL-shaped fan-out (steps x prompts x n completions x
            max tokens; default 4 x 64 x 8 x 48 on 64 slots; `--quick` for a ~2 minute run)
            -> controllers_official.json
  The simulation modes (default, --http) run in model time, where the official controller (wall-clock
  cooldowns) cannot, so they keep the rule rebuilt from its documented behaviour as "hosted".

    .venv/bin/python benchmarks/controllers.py [--http] [--real] [--official [--quick]] [--skip-des]
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


# -- official SDK baseline --------------------------------------------------------------------

OFFICIAL_VARIANTS = ("firetitan-fixed", "firetitan-adaptive", "official-fixed", "official-adaptive")


def _official_variant(name: str, url: str, model: str, fixed: int, initial: int) -> tuple[Any, Any]:
    """(sampler, controller) for one variant; the SDKs are used as a user would construct them."""
    if name.startswith("official"):
        from fireworks.training.sdk import AdaptiveConcurrencyController as OfficialAdaptive
        from fireworks.training.sdk import DeploymentSampler as OfficialSampler
        from fireworks.training.sdk import FixedConcurrencyController as OfficialFixed

        ctrl = OfficialFixed(fixed) if name.endswith("fixed") else OfficialAdaptive(initial_window=initial)
        # The official sampler refuses an empty key; the bench worker runs without one.
        return OfficialSampler(url, model, "bench-no-key", concurrency_controller=ctrl), ctrl
    from firetitan.client.concurrency import FixedConcurrencyController
    from firetitan.client.sampling import DeploymentSampler

    ctrl = FixedConcurrencyController(fixed) if name.endswith("fixed") else AdaptiveConcurrencyController(
        initial_window=initial)
    # URL first and the rest by keyword: valid for firetitan's sampler before and after it took the
    # official positional order (inference_url, model, api_key, ...).
    return DeploymentSampler(url, model=model, concurrency_controller=ctrl), ctrl


async def _official_run(name: str, url: str, args: argparse.Namespace, prompts: list[list[int]]) -> dict[str, Any]:
    sampler, ctrl = _official_variant(name, url, args.official_model_name, args.official_fixed,
                                      args.official_initial)
    steps: list[dict[str, Any]] = []
    t_run = time.monotonic()
    try:
        for step in range(args.official_steps):
            t0 = time.monotonic()
            window_before = ctrl.window_size
            batch = prompts[step * args.official_prompts:(step + 1) * args.official_prompts]
            results = await asyncio.gather(*(
                sampler.sample_with_prompt_tokens(p, n=args.official_n, max_tokens=args.official_max_tokens,
                                                  temperature=1.0, logprobs=True) for p in batch))
            wall = time.monotonic() - t0
            # Tokens counted from the logprobs: the official sampler's completion_len is only as right as
            # the raw_output it read (see docs/official-fireworks.md).
            tokens = sum(len(c.sampling_logprobs or []) for per_prompt in results for c in per_prompt)
            completions = sum(len(per_prompt) for per_prompt in results)
            summary = ctrl.step_completed() if hasattr(ctrl, "step_completed") else {}
            steps.append({"step": step, "wall_s": wall, "completion_tokens": tokens, "completions": completions,
                          "window_before": window_before, "window_after": ctrl.window_size,
                          "controller": {k: v for k, v in (summary or {}).items() if isinstance(v, int | float)}})
            print(f"  {name:<19} step {step}: {wall:6.1f}s {tokens:6d} tokens window {window_before}->"
                  f"{ctrl.window_size}", flush=True)
    finally:
        close = getattr(sampler, "aclose", None) or getattr(sampler, "close", None)
        if close is not None:
            out = close()
            if asyncio.iscoroutine(out):
                await out
    total = time.monotonic() - t_run
    tokens = sum(s["completion_tokens"] for s in steps)
    out: dict[str, Any] = {"label": name, "wall_s": total, "completion_tokens": tokens,
                           "output_tokens_per_s": tokens / total, "steps": steps}
    if isinstance(ctrl, AdaptiveConcurrencyController):  # firetitan's: every window decision, for the docs
        out["adjustments"] = [{k: v for k, v in a.items() if k != "t"} for a in ctrl.history]
    return out


async def official_mode(args: argparse.Namespace) -> dict[str, Any]:
    import random as _random

    from firetitan.server.process import spawn_worker

    rng = _random.Random(0)
    prompts = [[rng.randrange(100, 3000) for _ in range(rng.randint(16, 48))]
               for _ in range(args.official_steps * args.official_prompts)]
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="firetitan-bench-") as store:
        worker = spawn_worker("firetitan.server.deployment",
                              ["--store-dir", store, "--base-model", args.official_model, "--deployment-id", "bench",
                               "--max-running-seqs", str(args.official_capacity)], ready_timeout=600, threads=2)
        try:
            for name in args.official_variants:
                results.append(await _official_run(name, worker.url, args, prompts))
        finally:
            worker.stop()
    by = {r["label"]: r for r in results}
    best_fixed = by.get("firetitan-fixed")
    verdict_: dict[str, Any] = {}
    if best_fixed and "firetitan-adaptive" in by:
        verdict_["firetitan_adaptive_vs_fixed"] = best_fixed["wall_s"] / by["firetitan-adaptive"]["wall_s"]
    if "official-adaptive" in by and "firetitan-adaptive" in by:
        verdict_["firetitan_adaptive_vs_official_adaptive"] = (by["official-adaptive"]["wall_s"]
                                                               / by["firetitan-adaptive"]["wall_s"])
    if "official-fixed" in by and "official-adaptive" in by:
        verdict_["official_adaptive_vs_official_fixed"] = by["official-fixed"]["wall_s"] / by["official-adaptive"]["wall_s"]
    verdict_["goal"] = "firetitan adaptive >= 0.95x best fixed (whole run) and >= 2x the official adaptive"
    print(f"[official] {args.official_model} {args.official_steps} steps x {args.official_prompts} prompts x "
          f"{args.official_n} completions x {args.official_max_tokens} tokens, {args.official_capacity} slots")
    for r in results:
        print(f"  {r['label']:<19} {r['wall_s']:7.1f}s  {r['output_tokens_per_s']:8.1f} tokens/s")
    print(f"  verdict: {json.dumps(verdict_)}")
    return {"mode": "official SDK baseline on a real deployment worker", "model": args.official_model,
            "slots": args.official_capacity, "fixed_window": args.official_fixed,
            "initial_window": args.official_initial, "load_average_1m": os.getloadavg()[0],
            "verdict": verdict_, "runs": results}


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
    p.add_argument("--official", action="store_true", help="the official SDK baseline (see above)")
    p.add_argument("--quick", action="store_true", help="--official at ~2 minutes: 2 steps x 16 prompts on nano")
    p.add_argument("--official-model", default="firetitan/tiny-qwen3")
    p.add_argument("--official-model-name", default="accounts/local/deployments/bench",
                   help="the `model` field the samplers send")
    p.add_argument("--official-steps", type=int, default=4)
    p.add_argument("--official-prompts", type=int, default=64)
    p.add_argument("--official-n", type=int, default=8)
    p.add_argument("--official-max-tokens", type=int, default=48)
    p.add_argument("--official-capacity", type=int, default=64, help="the worker's --max-running-seqs")
    p.add_argument("--official-fixed", type=int, default=64, help="the fixed window (best measured: the slot count)")
    p.add_argument("--official-initial", type=int, default=16, help="initial window of both adaptive controllers")
    p.add_argument("--official-variants", nargs="+", default=list(OFFICIAL_VARIANTS), choices=OFFICIAL_VARIANTS)
    args = p.parse_args()
    if args.quick:
        args.official, args.skip_des = True, True
        args.official_model, args.official_steps, args.official_prompts = "firetitan/nano-qwen3", 2, 16
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
    if args.official:
        res = asyncio.run(official_mode(args))
        res["command"] = command
        name = "controllers_official_quick.json" if args.quick else "controllers_official.json"
        (RESULTS / name).write_text(json.dumps(res, indent=1, default=str))


if __name__ == "__main__":
    main()
