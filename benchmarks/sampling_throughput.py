"""Sampling throughput of one deployment URL (or the simulation) under several controllers, in one command.

    .venv/bin/python benchmarks/sampling_throughput.py --sim --controllers fixed:32 adaptive
    .venv/bin/python benchmarks/sampling_throughput.py --url http://127.0.0.1:8000 --api openai

Writes benchmarks/results/sampling_throughput.json (+ .png); every controller's throughput is also
given as a ratio to the first one listed (the baseline), measured in the same command.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from firetitan.bench.cli import add_sample_args  # noqa: E402
from firetitan.bench.harness import BenchOptions, run_benchmark  # noqa: E402
from firetitan.bench.load import RLLoad  # noqa: E402
from firetitan.bench.plot import plot_comparison  # noqa: E402
from firetitan.bench.runner import make_controller, start_simulation  # noqa: E402
from firetitan.bench.simulated_deployment import SimConfig  # noqa: E402


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    load = RLLoad(steps=args.steps, groups=args.groups, samples_per_group=args.samples,
                  max_tokens_median=args.max_tokens_median, max_tokens_max=args.max_tokens_max,
                  prompt_len_min=args.prompt_len_min, prompt_len_max=args.prompt_len_max, seed=args.seed)
    runs = []
    for spec in args.controllers:
        worker = start_simulation(SimConfig(capacity=args.capacity, time_scale=args.time_scale)) if args.sim else None
        try:
            r = await run_benchmark(BenchOptions(worker.url if worker else args.url, api=args.api,
                                                 api_key=args.api_key, model=args.model,
                                                 progress=not args.no_progress and sys.stderr.isatty(),
                                                 label=spec),
                                    load, make_controller(spec, prefill_queue_target=args.prefill_queue_target))
        finally:
            if worker is not None:
                worker.stop()
        runs.append(r)
    key = "output_tokens_per_sim_s" if args.sim else "output_tokens_per_s"
    base = runs[0][key] or 1.0
    summary = [{"controller": r["label"], key: r[key], "ratio_vs_first": r[key] / base,
                "requests_per_s": r["requests_per_s"], "prefill_queue_s": r["prefill_queue_s"],
                "client_ttft_s": r["client_ttft_s"], "failed_requests": r["failed_requests"]} for r in runs]
    for s in summary:
        print(json.dumps(s))
    plot_comparison(runs, args.out.with_suffix(".png"), throughput_key=key, title="sampling throughput")
    return {"command": "python " + " ".join(sys.argv), "summary": summary, "runs": runs}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sample_args(p)
    p.add_argument("--controllers", nargs="+", default=["fixed:32", "adaptive"])
    p.set_defaults(out=ROOT / "benchmarks" / "results" / "sampling_throughput.json")
    args = p.parse_args()
    result = asyncio.run(main_async(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=str))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
