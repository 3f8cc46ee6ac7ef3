"""Benchmark: the deployment runner's whole decode step through each projection path, per batch size.

In process, one model, the same KV state for every path (`--position`-token prompts, default 32, the
step repeated at that position): the prepared weights (oneDNN-prepacked on the CPU), the model's own
modules (BLAS), the native matmul's row-blocked weights (where gcc builds it) and weights MKL-packed for exactly that batch (float32 CPU); each with the torch ops between the
matmuls and, as `<path>+fused`, with the native fused glue (`engine/decode_glue.py`). The paths are timed
in alternating rounds, so machine noise hits them alike; each reports the median and best step over
`--rounds` x `--steps` steps, and its ratio to the prepared weights' median (torch ops). The matmul
paths are the candidates `path_choice` picks between when serving; the glue is used wherever it builds.

    .venv/bin/python benchmarks/decode_paths.py [--model models/smollm2-135m-instruct] [--batches 1,2,4,7,16]
        [--threads 2] [--rounds 3] [--steps 10] [--position 32]

Writes benchmarks/results/decode_paths[_<model>].json. Not part of `make test`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from firetitan.models import load_model
from firetitan.server.deployment.engine.decode_glue import DecodeGlue, decode_glue
from firetitan.server.deployment.engine.native import row_blocked_kernel
from firetitan.server.deployment.engine.ops import BatchPackedWeights, mkl_packing_works
from firetitan.server.deployment.engine.runner import DecodeOptions, ModelRunner

RESULTS = Path(__file__).parent / "results"


def _step_times(runner: ModelRunner, proj: Any, glue: DecodeGlue | None, batch: int, steps: int, position: int
                ) -> list[float]:
    times = []
    tokens = [11] * batch
    runner.glue = glue
    for _ in range(steps):
        for slot in range(batch):
            runner.cache.lengths[slot] = position  # the same position every step: the same work
        started = time.perf_counter()
        with torch.inference_mode():
            runner._decode_fast(tokens, proj)
        times.append(time.perf_counter() - started)
    return times


def measure(model: torch.nn.Module, batch: int, rounds: int, steps: int, position: int) -> dict[str, Any]:
    runner = ModelRunner(model, max_slots=batch, options=DecodeOptions(batch_packs=0))
    prompts = [[(7 * i + j) % 1000 + 5 for j in range(position)] for i in range(batch)]
    runner.prefill(runner.cache.allocate(batch), prompts)
    glue = runner.glue
    paths: dict[str, Any] = {"prepared": runner._projections(), "modules": runner.module_proj}
    if runner.row_blocked is not None:
        paths["row_blocked"] = runner.row_blocked
    if mkl_packing_works(runner.dtype, runner.device):
        paths["mkl_packed"] = BatchPackedWeights.for_rows(model, runner.layers, batch)
    # Each path with the torch ops between the matmuls, and (where the glue builds) with the fused glue.
    variants = {name: (proj, None) for name, proj in paths.items()}
    if glue is not None:
        variants |= {f"{name}+fused": (proj, glue) for name, proj in paths.items()}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, (proj, with_glue) in variants.items():
            _step_times(runner, proj, with_glue, batch, 2, position)  # a step through other weights evicts this one's first
            times[name] += _step_times(runner, proj, with_glue, batch, steps, position)
    base = statistics.median(times["prepared"])
    out = {}
    for name, series in times.items():
        median = statistics.median(series)
        out[name] = {"median_ms": round(1e3 * median, 2), "best_ms": round(1e3 * min(series), 2),
                     "speedup_vs_prepared": round(base / median, 3)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="models/smollm2-135m-instruct")
    parser.add_argument("--batches", default="1,2,4,7,16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--position", type=int, default=32, help="context length each step attends over")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.model).eval()
    results = []
    for batch in (int(b) for b in args.batches.split(",")):
        row = {"batch": batch, "paths": measure(model, batch, args.rounds, args.steps, args.position)}
        results.append(row)
        print(f"batch {batch:3d}  " + "  ".join(f"{name} {r['median_ms']:.1f} ms ({r['speedup_vs_prepared']:.2f}x)"
                                               for name, r in row["paths"].items()), flush=True)
    name = Path(args.model).name if Path(args.model).exists() else args.model.split("/")[-1]
    out = args.out or RESULTS / f"decode_paths_{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "benchmark": "decode_paths", "model": args.model, "threads": args.threads, "rounds": args.rounds,
        "steps": args.steps, "position": args.position, "native_kernel": row_blocked_kernel() is not None,
        "fused_glue": decode_glue() is not None, "results": results,
        "measured_at": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
    }, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
