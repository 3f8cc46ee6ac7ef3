"""`firetitan bench sample`: the sampling benchmark from the command line (registered with firetitan.cli)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from firetitan.cli import register_command


def add_sample_args(p: argparse.ArgumentParser) -> None:
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="deployment base URL (Fireworks or OpenAI completions API)")
    target.add_argument("--sim", action="store_true", help="start a SIMULATED deployment in a subprocess")
    p.add_argument("--api", choices=("fireworks", "openai"), default="fireworks")
    p.add_argument("--api-key", default=None)
    p.add_argument("--model", default="default")
    p.add_argument("--controller", default="adaptive", help="adaptive, adaptive:INITIAL or fixed:N")
    p.add_argument("--prefill-queue-target", type=float, default=0.5)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--groups", type=int, default=16, help="prompts per RL step (G)")
    p.add_argument("--samples", type=int, default=8, help="samples per prompt (n)")
    p.add_argument("--max-tokens-median", type=int, default=64)
    p.add_argument("--max-tokens-max", type=int, default=512)
    p.add_argument("--prompt-len-min", type=int, default=32)
    p.add_argument("--prompt-len-max", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--capacity", type=int, default=32, help="--sim: concurrent decode slots")
    p.add_argument("--time-scale", type=float, default=0.1, help="--sim: wall seconds per model second")
    p.add_argument("--out", type=Path, default=Path("bench_sample.json"))
    p.add_argument("--plot", type=Path, default=None, help="PNG path (default: next to --out)")
    p.add_argument("--no-progress", action="store_true")


def add_args(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench_command", metavar="BENCH", required=True)
    add_sample_args(sub.add_parser("sample", help="sampling throughput under a concurrency controller"))


async def run(args: argparse.Namespace) -> int:
    from firetitan.bench.harness import BenchOptions, run_benchmark
    from firetitan.bench.load import RLLoad
    from firetitan.bench.plot import plot_run
    from firetitan.bench.runner import make_controller, start_simulation
    from firetitan.bench.simulated_deployment import SimConfig

    load = RLLoad(steps=args.steps, groups=args.groups, samples_per_group=args.samples,
                  max_tokens_median=args.max_tokens_median, max_tokens_max=args.max_tokens_max,
                  prompt_len_min=args.prompt_len_min, prompt_len_max=args.prompt_len_max, seed=args.seed)
    controller = make_controller(args.controller, prefill_queue_target=args.prefill_queue_target)
    worker = start_simulation(SimConfig(capacity=args.capacity, time_scale=args.time_scale)) if args.sim else None
    url = worker.url if worker is not None else args.url
    try:
        result = await run_benchmark(
            BenchOptions(url, api=args.api, api_key=args.api_key, model=args.model,
                         progress=not args.no_progress and sys.stderr.isatty(), label=args.controller),
            load, controller)
    finally:
        if worker is not None:
            worker.stop()
    result["command"] = "firetitan bench sample " + " ".join(sys.argv[3:] if len(sys.argv) > 3 else [])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=str))
    plot_path = plot_run(result, args.plot or args.out.with_suffix(".png"))
    pq = result["prefill_queue_s"]
    print(f"{result['requests']} requests, {result['failed_requests']} failed, "
          f"{result['output_tokens_per_s']:.1f} output tok/s, {result['requests_per_s']:.2f} req/s, "
          f"prefill queue p50/p95/p99 = {pq['p50']}/{pq['p95']}/{pq['p99']} s")
    print(f"wrote {args.out} and {plot_path}")
    return 0 if result["failed_requests"] == 0 else 1


def _bench(args: argparse.Namespace) -> object:
    if args.bench_command == "sample":
        return run(args)
    return 2


register_command("bench", "benchmarks: `bench sample` drives a deployment with RL-shaped load", add_args, _bench)
