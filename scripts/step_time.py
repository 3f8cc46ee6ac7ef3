"""Median train-step time of a TrainerEngine job on a device and dtype, against float32 on the CPU (gpu_check.sh).

    python scripts/step_time.py --device cuda --dtype bfloat16 [--model firetitan/tiny-qwen3] [--steps 8]

Prints one JSON object: both medians, their ratio, and whether the losses of the two runs agree
(the same seed and batches, so a large gap means the device run computes something else).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from firetitan.devices import resolve_device
from firetitan.server.trainer.batch import prepare_batch
from firetitan.server.trainer.engine import ModelSpec, TrainerEngine
from firetitan.types import AdamParams, Datum, ModelInput, TensorData


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run(model: str, device: str, dtype: str, steps: int, rows: int, width: int) -> dict[str, object]:
    engine = TrainerEngine("step-time", ModelSpec(model, device=device, dtype=dtype), store=None, states=None)
    gen = torch.Generator().manual_seed(0)
    times, losses = [], []
    for step in range(steps + 2):  # two warm-up steps (allocator, kernels) are not timed
        ids = torch.randint(3, engine.vocab_size, (rows, width + 1), generator=gen)
        data = [Datum(model_input=ModelInput.from_ints(r[:-1].tolist()),
                      loss_fn_inputs={"target_tokens": TensorData.from_torch(r[1:])}) for r in ids]
        batch = prepare_batch(data, "cross_entropy", None, engine.vocab_size, engine.pad_id)
        _sync(device)
        started = time.perf_counter()
        out = engine.forward(batch, backward=True)
        engine.optim_step(AdamParams(learning_rate=1e-4))
        _sync(device)
        if step >= 2:
            times.append(time.perf_counter() - started)
        losses.append(out["metrics"]["loss:sum"] / (rows * width))
    return {"device": device, "dtype": dtype, "median_step_s": round(statistics.median(times), 4),
            "first_loss": round(losses[0], 4), "last_loss": round(losses[-1], 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="firetitan/tiny-qwen3")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--width", type=int, default=256)
    args = parser.parse_args()
    device = resolve_device(args.device, field="--device")
    target = run(args.model, device, args.dtype, args.steps, args.rows, args.width)
    cpu = run(args.model, "cpu", "float32", args.steps, args.rows, args.width)
    # bf16 rounding moves the mean token loss by well under 1%; 5% means different math.
    agree = abs(target["first_loss"] - cpu["first_loss"]) <= 0.05 * abs(cpu["first_loss"])
    print(json.dumps({"model": args.model, "target": target, "cpu_float32": cpu,
                      "step_time_over_cpu": round(target["median_step_s"] / cpu["median_step_s"], 3),
                      "losses_agree": agree}))


if __name__ == "__main__":
    main()
