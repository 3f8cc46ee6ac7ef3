"""Benchmark: one train step (forward_backward + optim_step) over HTTP vs the same torch step in-process.

Same command, same model, same batch, same torch thread count:

- in-process: `TrainerEngine` (the trainer worker's own engine) called directly: `prepare_batch`,
  forward + cross-entropy + backward, AdamW step;
- HTTP: a real trainer worker process (`python -m firetitan.server.trainer --threads N`) driven by
  `TrainingClient`: `forward_backward` and `optim_step` submitted back to back, then both awaited.

Blocks of steps alternate between the two (A B A B ...) so load from other processes hits both
alike; the medians are compared. Also saves a full-parameter `base` snapshot and, after more steps,
a `delta`, and reports the delta's size against the full size.

    .venv/bin/python benchmarks/trainer_step.py [--model firetitan/tiny-qwen3] [--batch 8] [--seq-len 256]
        [--steps 12] [--threads 1]

Then the data-parallel trainer (`--world-sizes 1,2`, "" to skip): one trainer job worker per world
size (`--world-size N`: N rank processes of `--threads` each, the model sharded with FSDP2 over gloo),
the same steps over HTTP in alternating blocks, and the median step time of each against world size 1.

Writes benchmarks/results/trainer_step.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from firetitan.client.training import TrainingClient
from firetitan.server.process import spawn_worker
from firetitan.server.trainer.batch import prepare_batch
from firetitan.server.trainer.engine import ModelSpec, TrainerEngine
from firetitan.types import AdamParams, Datum, ModelInput, TensorData

RESULTS = Path(__file__).resolve().parent / "results" / "trainer_step.json"


def make_batch(batch: int, seq_len: int, vocab: int, seed: int) -> list[Datum]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batch):
        seq = torch.randint(3, vocab, (seq_len + 1,), generator=gen)
        out.append(Datum(model_input=ModelInput.from_ints(seq[:-1].tolist()),
                         loss_fn_inputs={"target_tokens": TensorData.from_torch(seq[1:]),
                                         "weights": TensorData.from_torch(torch.ones(seq_len))}))
    return out


def in_process_step(engine: TrainerEngine, data: list[Datum], adam: AdamParams) -> float:
    start = time.perf_counter()
    batch = prepare_batch(data, "cross_entropy", None, engine.vocab_size, engine.pad_id)
    engine.forward(batch, backward=True)
    engine.optim_step(adam)
    return time.perf_counter() - start


def http_step(tc: TrainingClient, data: list[Datum], adam: AdamParams) -> float:
    start = time.perf_counter()
    fb = tc.forward_backward(data, "cross_entropy")
    opt = tc.optim_step(adam)
    fb.result()
    opt.result()
    return time.perf_counter() - start


def world_size_steps(args: argparse.Namespace, data: list[Datum], adam: AdamParams,
                     root: Path) -> dict[str, Any]:
    """Median HTTP step time of a trainer job worker per world size, in alternating blocks."""
    sizes = [int(x) for x in args.world_sizes.split(",") if x.strip()]
    workers, clients = {}, {}
    try:
        for n in sizes:
            workers[n] = spawn_worker(
                "firetitan.server.trainer",
                ["--store-dir", str(root / f"store-ws{n}"), "--state-dir", str(root / f"state-ws{n}"),
                 "--base-model", args.model, "--job-id", f"ws{n}", "--world-size", str(n),
                 "--autosave-every", "0"],
                threads=args.threads, log_path=root / f"trainer-ws{n}.log", ready_timeout=300)
            clients[n] = TrainingClient.create(workers[n].url, args.model)  # the preloaded job model
        times: dict[int, list[float]] = {n: [] for n in sizes}
        for n in sizes:
            for _ in range(2):
                http_step(clients[n], data, adam)
        while min(len(t) for t in times.values()) < args.steps:
            for n in sizes:
                times[n] += [http_step(clients[n], data, adam) for _ in range(args.block)]
    finally:
        for n in clients:
            clients[n].close()
        for w in workers.values():
            w.stop()
    medians = {n: statistics.median(t[: args.steps]) for n, t in times.items()}
    first = sizes[0]
    return {"world_sizes": sizes, "threads_per_rank": args.threads,
            "step_s_median": {str(n): m for n, m in medians.items()},
            "step_s_all": {str(n): t[: args.steps] for n, t in times.items()},
            f"ratio_to_ws{first}": {str(n): m / medians[first] for n, m in medians.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="firetitan/tiny-qwen3")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=12, help="timed steps per side (after 2 warm-up steps)")
    parser.add_argument("--block", type=int, default=3, help="steps per alternating block")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--small-calls", type=int, default=20, help="tiny forward calls timed per side")
    parser.add_argument("--world-sizes", default="1,2", help='data-parallel world sizes to compare ("" = skip)')
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    data = make_batch(args.batch, args.seq_len, 4096, seed=0)
    adam = AdamParams(learning_rate=1e-4, eps=1e-8)
    engine = TrainerEngine("bench", ModelSpec(base_model=args.model), store=None, states=None)

    with tempfile.TemporaryDirectory(prefix="ft-bench-trainer-") as tmp:
        root = Path(tmp)
        worker = spawn_worker("firetitan.server.trainer",
                              ["--store-dir", str(root / "store"), "--state-dir", str(root / "state")],
                              threads=args.threads, log_path=root / "trainer.log", ready_timeout=300)
        tc = TrainingClient.create(worker.url, args.model)
        try:
            for _ in range(2):  # warm-up: first-call allocations, thread pools, connection setup
                in_process_step(engine, data, adam)
                http_step(tc, data, adam)
            local: list[float] = []
            remote: list[float] = []
            while len(local) < args.steps:
                local += [in_process_step(engine, data, adam) for _ in range(args.block)]
                remote += [http_step(tc, data, adam) for _ in range(args.block)]
            local, remote = local[: args.steps], remote[: args.steps]

            # Fixed per-call cost: a tiny forward (1 x 8 tokens) over HTTP vs in-process.
            tiny = make_batch(1, 8, 4096, seed=1)
            small_local, small_remote = [], []
            for _ in range(args.small_calls):
                start = time.perf_counter()
                engine.forward(prepare_batch(tiny, "cross_entropy", None, engine.vocab_size), backward=False)
                small_local.append(time.perf_counter() - start)
                start = time.perf_counter()
                tc.forward(tiny).result()
                small_remote.append(time.perf_counter() - start)

            base = tc.save_weights_for_sampler("bench-base").result()
            for _ in range(3):
                http_step(tc, data, adam)
            delta = tc.save_weights_for_sampler("bench-delta").result()
        finally:
            tc.unload_model().result(60)
            tc.close()
            worker.stop()
        data_parallel = world_size_steps(args, data, adam, root) if args.world_sizes.strip() else None

    med_local, med_remote = statistics.median(local), statistics.median(remote)
    result: dict[str, Any] = {
        "benchmark": "trainer_step",
        "command": "python benchmarks/trainer_step.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out"),
        "model": args.model,
        "batch": args.batch,
        "seq_len": args.seq_len,
        "threads": args.threads,
        "steps_timed": args.steps,
        "in_process_step_s": {"median": med_local, "min": min(local), "all": local},
        "http_step_s": {"median": med_remote, "min": min(remote), "all": remote},
        "http_overhead_ratio_median": med_remote / med_local - 1.0,
        "http_overhead_ratio_min": min(remote) / min(local) - 1.0,
        "http_overhead_ms_median": (med_remote - med_local) * 1e3,
        "goal_overhead_ratio": 0.10,
        "tiny_forward_ms": {"in_process_median": statistics.median(small_local) * 1e3,
                            "http_median": statistics.median(small_remote) * 1e3,
                            "http_fixed_cost_median": (statistics.median(small_remote)
                                                       - statistics.median(small_local)) * 1e3},
        "snapshot": {
            "base_size_bytes": base.size_bytes,
            "delta_size_bytes": delta.size_bytes,
            "full_size_bytes": delta.full_size_bytes,
            "delta_to_full_ratio": delta.size_bytes / delta.full_size_bytes if delta.full_size_bytes else None,
            "delta_steps_after_base": 3,
            "learning_rate": adam.learning_rate,
        },
        "data_parallel": data_parallel,
        "host": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                 "load_avg_1m": os.getloadavg()[0], "torch": torch.__version__},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("http_overhead_ratio_median", "http_overhead_ms_median",
                                             "tiny_forward_ms")}
                     | {"in_process_median_s": med_local, "http_median_s": med_remote,
                        "delta_to_full_ratio": result["snapshot"]["delta_to_full_ratio"],
                        "data_parallel_step_s_median": data_parallel and data_parallel["step_s_median"]},
                     indent=2))


if __name__ == "__main__":
    main()
