"""How a group of completions is requested: wall time and CPU per batch, client and deployment.

One embedded deployment (nano-qwen3 by default); batches of `--groups` prompts x `--group-size`
completions, sampled by `DeploymentSampler` straight from the replica in four ways:
`fanout="requests"|"choices"` x `stream=True|False`. The variants run round-robin in the same
process, so machine noise spreads over all of them. Writes benchmarks/results/sampling_fanout.json.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/sampling_fanout.py
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from firetitan.client.concurrency import FixedConcurrencyController  # noqa: E402
from firetitan.client.service import FiretitanServiceClient  # noqa: E402
from firetitan.models import load_tokenizer  # noqa: E402
from firetitan.recipes.text import encode_prompt  # noqa: E402

VARIANTS = {  # name -> (fanout, stream); the first is the SDK default, the baseline of the ratios
    "requests_stream": ("requests", True),
    "requests_json": ("requests", False),
    "choices_stream": ("choices", True),
    "choices_json": ("choices", False),
}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    home = tempfile.mkdtemp(prefix="ft-bench-fanout-")
    service = FiretitanServiceClient.from_firetitan_config(
        base_model=args.model, tokenizer_model=args.model, home=home, cleanup_trainer_on_close=True,
        cleanup_deployment_on_close="delete")  # the trainer it also provisions idles meanwhile
    tok = load_tokenizer(args.model)
    window = args.groups * args.group_size
    try:
        samplers = {name: await service.create_deployment_sampler_async(
            tokenizer=tok, concurrency_controller=FixedConcurrencyController(window), fanout=fanout, stream=stream)
            for name, (fanout, stream) in VARIANTS.items()}
        replica = await samplers["requests_stream"].routing.acquire()  # type: ignore[union-attr]
        samplers["requests_stream"].routing.release(replica)  # type: ignore[union-attr]
        if replica is None:
            raise SystemExit("no replica reachable directly; this benchmark measures the replica path")
        pids = [p.pid for p in psutil.process_iter(["cmdline"])
                if home in " ".join(p.info["cmdline"] or []) and "firetitan.server.deployment" in " ".join(p.info["cmdline"] or [])]
        deployment, me = psutil.Process(pids[0]), psutil.Process()
        prompts = [encode_prompt(tok, f"say words about {w}") for w in ("apples", "the sea", "an owl", "ice", "rain",
                                                                          "stars", "bread", "snow")][: args.groups]

        async def batch(name: str) -> None:
            await asyncio.gather(*(samplers[name].sample_with_prompt_tokens(
                p, n=args.group_size, max_tokens=args.max_tokens, temperature=1.0, stop=["\n"], logprobs=True)
                for p in prompts))

        for name in VARIANTS:  # warm-up: connections, prefix cache, allocator
            for _ in range(3):
                await batch(name)
        totals = {name: {"wall_s": 0.0, "client_cpu_s": 0.0, "deployment_cpu_s": 0.0, "batches": 0} for name in VARIANTS}
        for _ in range(args.rounds):
            for name in VARIANTS:
                c0, d0, t0 = sum(me.cpu_times()[:2]), sum(deployment.cpu_times()[:2]), time.perf_counter()
                for _ in range(args.batches):
                    await batch(name)
                t = totals[name]
                t["wall_s"] += time.perf_counter() - t0
                t["client_cpu_s"] += sum(me.cpu_times()[:2]) - c0
                t["deployment_cpu_s"] += sum(deployment.cpu_times()[:2]) - d0
                t["batches"] += args.batches
        for s in samplers.values():
            await s.close()
    finally:
        await service.close_async()
    rows = {name: {"wall_ms_per_batch": 1000 * t["wall_s"] / t["batches"],
                   "client_cpu_ms_per_batch": 1000 * t["client_cpu_s"] / t["batches"],
                   "deployment_cpu_ms_per_batch": 1000 * t["deployment_cpu_s"] / t["batches"],
                   "batches": t["batches"]} for name, t in totals.items()}
    base = rows["requests_stream"]
    for row in rows.values():
        row["wall_speedup_vs_requests_stream"] = base["wall_ms_per_batch"] / row["wall_ms_per_batch"]
        row["cpu_ratio_vs_requests_stream"] = ((row["client_cpu_ms_per_batch"] + row["deployment_cpu_ms_per_batch"])
                                               / (base["client_cpu_ms_per_batch"] + base["deployment_cpu_ms_per_batch"]))
    return {"benchmark": "sampling_fanout", "model": args.model, "groups": args.groups, "group_size": args.group_size,
            "max_tokens": args.max_tokens, "route": "direct to the replica", "variants": rows,
            "cpu_count": os.cpu_count(), "load_avg_1m": os.getloadavg()[0], "python": platform.python_version(),
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="firetitan/nano-qwen3")
    ap.add_argument("--groups", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=6, help="round-robin passes over the variants")
    ap.add_argument("--batches", type=int, default=10, help="batches per variant per round")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "sampling_fanout.json")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    report = asyncio.run(run(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    for name, row in report["variants"].items():
        print(f"{name:16s} wall {row['wall_ms_per_batch']:6.1f} ms  client cpu {row['client_cpu_ms_per_batch']:5.1f} ms"
              f"  deployment cpu {row['deployment_cpu_ms_per_batch']:6.1f} ms  speedup x{row['wall_speedup_vs_requests_stream']:.2f}")


if __name__ == "__main__":
    main()
