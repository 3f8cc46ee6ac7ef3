"""Benchmark: sampler snapshot sizes (full base vs lossless delta) and save/load times on tiny-qwen3.

For each weight dtype, learning rate and number of AdamW steps: save a base, train, save a delta
against it, check the delta reproduces the weights bit for bit, and record both sizes, their ratio,
and the save/apply times (median of a few repeats). Baselines in the same run: the base save/load
itself, zlib instead of zstd, and the XOR compressed without the byte-plane shuffle.

`engine_chain` is the path a trainer job really takes: a `TrainerEngine` with float32 master weights
(bf16 jobs train under autocast) saves a sampler snapshot after every step, in the job's dtype, and
starts a new base whenever a delta passes REBASE_DELTA_FRACTION of a full save. Each snapshot's size is
reported against a full save in its own dtype and against a float32 full save.

    .venv/bin/python benchmarks/snapshot_size.py [--model firetitan/tiny-qwen3] [--repeats 3]

Writes benchmarks/results/snapshot_size.json.
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

from firetitan.checkpoints import SnapshotStore
from firetitan.checkpoints import delta as dz
from firetitan.models import load_model

RESULTS = Path(__file__).resolve().parent / "results" / "snapshot_size.json"


def _train(model: torch.nn.Module, lr: float, steps: int, seed: int = 0) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        ids = torch.randint(3, model.config.vocab_size, (8, 64), generator=gen)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()


def _timed(fn: Any, repeats: int) -> tuple[Any, float]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return out, statistics.median(times)


def _unshuffled_size(new: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> int:
    total = 0
    for key, t in new.items():
        xor = dz.tensor_bytes(t) ^ dz.tensor_bytes(base[key])
        if xor.any():
            total += len(dz.compress(xor, "zstd"))
    return total


def run_case(model_name: str, dtype: torch.dtype, lr: float, steps: int, repeats: int, root: Path) -> dict[str, Any]:
    model = load_model(model_name, dtype=dtype)
    store = SnapshotStore(root / f"{dz.dtype_name(dtype)}-{lr:g}-{steps}")
    base_sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    counter = iter(range(1_000_000))

    base, t_base_save = _timed(lambda: store.save_base(f"base-{next(counter)}", base_sd, model.config), repeats)
    _, t_base_load = _timed(lambda: store.load_state_dict(base.identity), repeats)

    _train(model, lr, steps)
    new_sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    changed = sum(int(not torch.equal(new_sd[k], base_sd[k])) for k in new_sd)
    changed_elems = sum(int((new_sd[k] != base_sd[k]).sum()) for k in new_sd)
    total_elems = sum(t.numel() for t in new_sd.values())

    delta, t_delta_save = _timed(
        lambda: store.save_delta(f"delta-{next(counter)}", new_sd, base.identity, base_state_dict=base_sd), repeats
    )
    applied, t_delta_apply = _timed(lambda: store.load_state_dict(delta.identity, base_sd), repeats)
    exact = all(torch.equal(applied[k], new_sd[k]) for k in new_sd)
    zlib_delta = store.save_delta(f"delta-zlib-{next(counter)}", new_sd, base.identity, base_state_dict=base_sd,
                                  codec="zlib")
    full_payload = base.files and (store.base_dir(base.identity) / "model.safetensors").stat().st_size
    return {
        "dtype": dz.dtype_name(dtype),
        "lr": lr,
        "steps": steps,
        "tensors_changed": f"{changed}/{len(new_sd)}",
        "elements_changed_fraction": round(changed_elems / total_elems, 4),
        "base_weights_bytes": full_payload,
        "delta_bytes": delta.size_bytes,
        "delta_over_full": round(delta.size_bytes / full_payload, 4),
        "delta_zlib_bytes": zlib_delta.size_bytes,
        "delta_zlib_over_full": round(zlib_delta.size_bytes / full_payload, 4),
        "xor_zstd_no_shuffle_over_full": round(_unshuffled_size(new_sd, base_sd) / full_payload, 4),
        "bit_exact": exact,
        "base_save_s": round(t_base_save, 4),
        "base_load_s": round(t_base_load, 4),
        "delta_save_s": round(t_delta_save, 4),
        "delta_apply_s": round(t_delta_apply, 4),
        "delta_save_over_base_save": round(t_delta_save / t_base_save, 3),
        "delta_apply_over_base_load": round(t_delta_apply / t_base_load, 3),
    }


def run_engine_chain(model_name: str, dtype: str, lr: float, steps: int, root: Path) -> dict[str, Any]:
    """Snapshots after each of `steps` AdamW steps of a TrainerEngine job in `dtype` (automatic base/delta)."""
    from firetitan.server.trainer.batch import prepare_batch
    from firetitan.server.trainer.engine import REBASE_DELTA_FRACTION, ModelSpec, TrainerEngine
    from firetitan.types import AdamParams, Datum, ModelInput, TensorData

    engine = TrainerEngine("bench", ModelSpec(model_name, dtype=dtype), store=SnapshotStore(root / f"chain-{dtype}-{lr:g}"),
                           states=None)
    fp32_full = sum(p.numel() * 4 for p in engine.model.state_dict().values())
    gen = torch.Generator().manual_seed(0)
    snaps = []
    for step in range(steps):
        ids = torch.randint(3, engine.vocab_size, (8, 65), generator=gen)
        data = [Datum(model_input=ModelInput.from_ints(row[:-1].tolist()),
                      loss_fn_inputs={"target_tokens": TensorData.from_torch(row[1:])}) for row in ids]
        engine.forward(prepare_batch(data, "cross_entropy", None, engine.vocab_size), backward=True)
        engine.optim_step(AdamParams(learning_rate=lr, weight_decay=0.01))
        started = time.perf_counter()
        out = engine.save_for_sampler(f"s{step}", None, None)
        save_s = time.perf_counter() - started
        full = out["full_size_bytes"] or out["size_bytes"]
        snaps.append({"step": step + 1, "kind": out["checkpoint_type"], "bytes": out["size_bytes"],
                      "over_full_same_dtype": round(out["size_bytes"] / full, 4),
                      "over_full_float32": round(out["size_bytes"] / fp32_full, 4), "save_s": round(save_s, 4)})
    deltas = [s for s in snaps if s["kind"] == "delta"]
    return {"dtype": dtype, "lr": lr, "steps": steps, "rebase_delta_fraction": REBASE_DELTA_FRACTION,
            "float32_full_bytes": fp32_full, "bases": sum(s["kind"] == "base" for s in snaps),
            "delta_over_full_same_dtype": [min(s["over_full_same_dtype"] for s in deltas),
                                           max(s["over_full_same_dtype"] for s in deltas)] if deltas else None,
            "delta_over_full_float32": [min(s["over_full_float32"] for s in deltas),
                                        max(s["over_full_float32"] for s in deltas)] if deltas else None,
            "snapshots": snaps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="firetitan/tiny-qwen3")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--chain-steps", type=int, default=10, help="steps of each engine_chain run")
    parser.add_argument("--chain-only", action="store_true", help="skip the dtype x lr x steps grid")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    rows: list[dict[str, Any]] = []
    chain: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in (torch.float32, torch.bfloat16):
            for lr in (1e-5, 1e-4):
                for steps in (1, 10):
                    if args.chain_only:
                        continue
                    row = run_case(args.model, dtype, lr, steps, args.repeats, Path(tmp))
                    rows.append(row)
                    print(json.dumps(row))
        for name in ("float32", "bfloat16"):
            for lr in (1e-5, 1e-4):
                run = run_engine_chain(args.model, name, lr, args.chain_steps, Path(tmp))
                chain.append(run)
                print(json.dumps({k: v for k, v in run.items() if k != "snapshots"}))
    result = {
        "benchmark": "snapshot_size",
        "model": args.model,
        "params": sum(p.numel() for p in load_model(args.model).parameters()),
        "codec": dz.DEFAULT_CODEC,
        "batch": "8x64 random tokens per step, AdamW(weight_decay=0.01)",
        "repeats": args.repeats,
        "threads": args.threads,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "rows": rows,
        "engine_chain": chain,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
