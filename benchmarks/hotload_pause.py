"""Benchmark: how long sampling pauses while a deployment hot-loads new weights (ASYNC swap).

Starts a real deployment worker on loopback, keeps `--streams` streaming completions running, and
hot-loads a base snapshot and then a delta in the middle of them. Per stream, the client records when
each token arrives; the result compares the inter-token gap that spans the weight swap (the last token
of the old version to the first of the new) with the ordinary gaps of the same streams (baseline in the
same run). Also reports the engine-side swap time (`firetitan_hot_load_last_swap_seconds`) and the
hot-load request latency (read + verify + prepare + swap).

    .venv/bin/python benchmarks/hotload_pause.py [--model firetitan/tiny-qwen3] [--streams 8] [--threads 1]

Writes benchmarks/results/hotload_pause.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import aiohttp
import torch

from firetitan.checkpoints import SnapshotStore
from firetitan.models import load_model
from firetitan.server.process import spawn_worker

RESULTS = Path(__file__).resolve().parent / "results" / "hotload_pause.json"
TIMEOUT = aiohttp.ClientTimeout(total=600)


async def one_stream(session: aiohttp.ClientSession, url: str, prompt: list[int], max_tokens: int,
                     started: asyncio.Event) -> list[tuple[float, str]]:
    """(arrival time, policy version) per token of one streamed completion."""
    arrivals: list[tuple[float, str]] = []
    body = {"prompt": prompt, "max_tokens": max_tokens, "stream": True, "logprobs": True, "ignore_eos": True}
    async with session.post(f"{url}/inference/v1/completions", json=body) as resp:
        resp.raise_for_status()
        buf = b""
        async for data in resp.content.iter_any():
            now = time.perf_counter()
            buf += data
            while b"\n\n" in buf:
                event, buf = buf.split(b"\n\n", 1)
                payload = event.decode().removeprefix("data: ")
                if payload == "[DONE]":
                    return arrivals
                for choice in json.loads(payload)["choices"]:
                    # Per-token versions as they arrive (raw_output is whole, on the final chunk only).
                    arrivals.extend((now, e["policy_version"]) for e in choice["logprobs"]["content"])
                started.set()
    return arrivals


async def swap_round(session: aiohttp.ClientSession, url: str, body: dict[str, Any], streams: int,
                     max_tokens: int, lead_s: float) -> dict[str, Any]:
    started = asyncio.Event()
    gen = torch.Generator().manual_seed(len(body["identity"]))
    prompts = [[1, *torch.randint(3, 4000, (31,), generator=gen).tolist()] for _ in range(streams)]
    tasks = [asyncio.create_task(one_stream(session, url, p, max_tokens, started)) for p in prompts]
    await started.wait()
    await asyncio.sleep(lead_s)  # let ordinary gaps accumulate before the swap
    sent = time.perf_counter()
    async with session.post(f"{url}/hot_load/v1/models/hot_load", json=body) as resp:
        out = await resp.json()
        assert resp.status == 200, out
    returned = time.perf_counter()
    per_stream = await asyncio.gather(*tasks)
    async with session.get(f"{url}/metrics") as resp:
        text = await resp.text()
    engine_swap = float(re.search(r"firetitan_hot_load_last_swap_seconds\{[^}]*\} (\S+)", text)[1])
    swap_gaps, normal_gaps = [], []
    for arrivals in per_stream:
        gaps = [(arrivals[i][0] - arrivals[i - 1][0], arrivals[i - 1][1] != arrivals[i][1])
                for i in range(1, len(arrivals)) if arrivals[i][0] > arrivals[i - 1][0]]
        for gap, crosses in gaps:
            (swap_gaps if crosses else normal_gaps).append(gap)
    switched = sum(1 for a in per_stream if a and a[0][1] != a[-1][1])
    normal_gaps.sort()
    return {
        "identity": body["identity"], "kind": "delta" if body.get("incremental_snapshot_metadata") else "base",
        "streams": streams, "streams_switching_version_mid_stream": switched,
        "hot_load_request_s": returned - sent, "engine_swap_s": engine_swap,
        "swap_gap_max_s": max(swap_gaps) if swap_gaps else None,
        "swap_gap_mean_s": statistics.fmean(swap_gaps) if swap_gaps else None,
        "normal_gap_p50_s": normal_gaps[len(normal_gaps) // 2],
        "normal_gap_p99_s": normal_gaps[int(len(normal_gaps) * 0.99)],
        "normal_gap_max_s": normal_gaps[-1],
        "swap_gap_over_normal_p50": (max(swap_gaps) / normal_gaps[len(normal_gaps) // 2]) if swap_gaps else None,
    }


async def run(args: argparse.Namespace, store_dir: Path) -> dict[str, Any]:
    model = load_model(args.model)
    store = SnapshotStore(store_dir)
    gen = torch.Generator().manual_seed(0)
    sd1 = {k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in model.state_dict().items()}
    base = store.save_base("pause-base", sd1, model.config, base_model=args.model)
    sd2 = {k: v + 0.001 * torch.randn(v.shape, generator=gen) for k, v in sd1.items()}
    delta = store.save_delta("pause-delta", sd2, base.identity)
    worker = spawn_worker("firetitan.server.deployment",
                          ["--base-model", args.model, "--store-dir", str(store_dir), "--max-running-seqs",
                           str(max(args.streams, 8))], threads=args.threads, ready_timeout=300)
    try:
        async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
            rounds = [
                await swap_round(session, worker.url, {"identity": base.identity, "mode": "ASYNC"},
                                 args.streams, args.max_tokens, args.lead_s),
                await swap_round(session, worker.url, {"identity": delta.identity, "mode": "ASYNC",
                                                       "incremental_snapshot_metadata": {
                                                           "previous_snapshot_identity": base.identity}},
                                 args.streams, args.max_tokens, args.lead_s),
            ]
    finally:
        worker.stop()
    return {"rounds": rounds, "params": sum(p.numel() for p in model.parameters())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="firetitan/tiny-qwen3")
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=300)
    parser.add_argument("--lead-s", type=float, default=1.0, help="seconds of ordinary decoding before the swap")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="firetitan-hotload-bench-") as tmp:
        measured = asyncio.run(run(args, Path(tmp)))
    result = {
        "benchmark": "hotload_pause",
        "command": f"python benchmarks/hotload_pause.py --model {args.model} --streams {args.streams} "
                   f"--max-tokens {args.max_tokens} --threads {args.threads}",
        "model": args.model, **measured,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "load_average": os.getloadavg()},
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    for r in result["rounds"]:
        print(f"{r['kind']}: swap gap max {r['swap_gap_max_s']}, normal p50 {r['normal_gap_p50_s']:.4f}s "
              f"p99 {r['normal_gap_p99_s']:.4f}s, engine swap {r['engine_swap_s']:.4f}s, "
              f"hot-load request {r['hot_load_request_s']:.3f}s, switched {r['streams_switching_version_mid_stream']}"
              f"/{r['streams']}")


if __name__ == "__main__":
    main()
