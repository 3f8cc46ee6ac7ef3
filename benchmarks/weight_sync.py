"""Benchmark: weight sync per RL step (save a sampler snapshot + hot-load it) against the train step, fp32 and bf16.

One process plays both sides with the real code paths: a full-parameter `TrainerEngine` job (float32
master weights; bf16 jobs train under autocast and snapshot in bf16) takes a train step
(forward_backward + optim_step on 8 x 64 random tokens), saves a sampler snapshot (the first a base,
then deltas, a new base when a delta passes REBASE_DELTA_FRACTION), and a deployment-side
`SnapshotLoader` prepares it and copies it into a served model of the job's dtype, as a replica's
hot-load does (HTTP and the engine's step boundary left out). Two paths, each on its own store:
`shm` (same host: the save publishes a shared-memory segment and returns, the base/delta files are
written in the background while the next step trains; the hot-load checks each tensor's CRC-32 and
copies from the mapping) and `file` ($FIRETITAN_SHM_SYNC=0, as across hosts: the save writes the
files, the hot-load verifies and applies them). Every time is measured in this same command, and
reported per step and as (save + hot-load) / train step; a save's time includes any wait for the
previous background write.

    .venv/bin/python benchmarks/weight_sync.py [--model firetitan/tiny-qwen3] [--steps 6]
    .venv/bin/python benchmarks/weight_sync.py --model models/smollm2-135m-instruct   # opt-in, `make smollm2`
    .venv/bin/python benchmarks/weight_sync.py --synthetic-smollm2 --steps 4   # SmolLM2-135M shapes, random init

Writes benchmarks/results/weight_sync[_<model>].json.
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

from firetitan.checkpoints import SnapshotStore, shm
from firetitan.models import load_model
from firetitan.server.deployment.hotload import HotLoadState, SnapshotLoader
from firetitan.server.deployment.weight_copy import copy_weights
from firetitan.server.trainer.batch import prepare_batch
from firetitan.server.trainer.engine import ModelSpec, TrainerEngine
from firetitan.types import AdamParams, Datum, ModelInput, TensorData

RESULTS = Path(__file__).resolve().parent / "results"


def _batch(engine: TrainerEngine, gen: torch.Generator, rows: int, width: int) -> Any:
    ids = torch.randint(3, engine.vocab_size, (rows, width + 1), generator=gen)
    data = [Datum(model_input=ModelInput.from_ints(r[:-1].tolist()),
                  loss_fn_inputs={"target_tokens": TensorData.from_torch(r[1:])}) for r in ids]
    return prepare_batch(data, "cross_entropy", None, engine.vocab_size, engine.pad_id)


def synthetic_smollm2(directory: Path) -> str:
    """A LlamaForCausalLM with SmolLM2-135M-Instruct's shapes (134.5 M parameters, tied embeddings), random
    init, as a local HF directory: snapshot sizes and sync times at that scale without the real weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                         rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True, pad_token_id=2,
                         bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(str(directory))
    return str(directory)


def run(model_name: str, dtype: str, path: str, steps: int, lr: float, root: Path) -> dict[str, Any]:
    # Both sides read the switch: "file" is what a trainer and a replica on different hosts do.
    os.environ[shm.SHM_ENV] = "1" if path == "shm" else "0"
    store = SnapshotStore(root / f"{dtype}-{path}")
    served = load_model(model_name, dtype=dtype)  # the replica's model, in the served dtype
    loader = SnapshotLoader(store, dict(served.state_dict()), startup={})  # registers as a same-host reader
    engine = TrainerEngine("bench", ModelSpec(model_name, dtype=dtype), store=store, states=None)
    state = HotLoadState(base_model=model_name)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for step in range(steps):
        batch = _batch(engine, gen, 8, 64)
        t0 = time.perf_counter()
        engine.forward(batch, backward=True)
        engine.optim_step(AdamParams(learning_rate=lr, weight_decay=0.01))
        t1 = time.perf_counter()
        out = engine.save_for_sampler(f"sync-{step}", None, None)
        t2 = time.perf_counter()
        loader.check_chain(out["path"], None, state)
        prepared = loader.prepare(out["path"], state)
        copy_weights(served, prepared.state_dict)  # the engine's swap (one copy per tensor, one thread)
        if prepared.kind == "base":  # what ReplicaHotLoader._served keeps
            state.base_identity = prepared.identity
            state.base_state_dict = None if prepared.segment is not None else (
                prepared.stored if prepared.stored is not None else prepared.state_dict)
        if prepared.segment is not None and loader.shm_dir is not None:
            shm.ack(loader.shm_dir, prepared.segment)
        del prepared
        t3 = time.perf_counter()
        train_s, save_s, load_s = t1 - t0, t2 - t1, t3 - t2
        assert engine.snapshots is not None
        rows.append({"step": step + 1, "kind": out["checkpoint_type"], "bytes": out["size_bytes"],
                     "waited_for_previous_durable_s": round(engine.snapshots.last_flush_wait_s, 4),
                     "train_s": round(train_s, 4), "save_s": round(save_s, 4), "hot_load_s": round(load_s, 4),
                     "sync_s": round(save_s + load_s, 4), "sync_over_train": round((save_s + load_s) / train_s, 3)})
        print(json.dumps({"dtype": dtype, "path": path, **rows[-1]}), flush=True)
    # The served model must now equal the trainer's weights in the served dtype, bit for bit, and so
    # must the last durable snapshot (written in the background on the shm path).
    want = {k: v.detach().to(served.dtype) for k, v in engine.model.state_dict().items()}
    exact = all(torch.equal(served.state_dict()[k], want[k]) for k in want)
    t = time.perf_counter()
    engine.snapshots.flush()
    last_flush_s = time.perf_counter() - t
    durable = store.load_state_dict(out["path"])
    durable_exact = all(torch.equal(durable[k], want[k]) for k in want)
    kinds = {m.identity: (m.kind, m.size_bytes) for m in store.list()}
    for r, ident in zip(rows, [f"sync-{i}" for i in range(steps)], strict=True):
        r["durable_kind"], r["bytes"] = kinds[ident]  # the shm save returns before the file size is known
    engine.close()
    left = shm.live_segments(loader.shm_dir) if loader.shm_dir is not None else []
    deltas = [r for r in rows if r["kind"] == "delta"]

    def med(key: str, rs: list[dict[str, Any]]) -> float | None:
        return round(statistics.median(r[key] for r in rs), 4) if rs else None

    return {"dtype": dtype, "path": path, "steps": steps, "served_equals_trainer": exact,
            "durable_equals_trainer": durable_exact, "segments_left_after_close": len(left),
            "last_durable_flush_s": round(last_flush_s, 4),
            "median_sync_s": med("sync_s", rows[1:]), "median_sync_over_train": med("sync_over_train", rows[1:]),
            "median_train_s": med("train_s", rows),
            "base": {"save_s": rows[0]["save_s"], "hot_load_s": rows[0]["hot_load_s"], "bytes": rows[0]["bytes"],
                     "sync_over_train": rows[0]["sync_over_train"]},
            "delta_median": {"save_s": med("save_s", deltas), "hot_load_s": med("hot_load_s", deltas),
                             "bytes": med("bytes", deltas), "sync_over_train": med("sync_over_train", deltas)},
            "rows": rows}


def spread(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per dtype and path over every run: min-max of the median sync (save + hot-load after the base),
    of its ratio to the train step, and of the base's sync, so a loaded machine's noise shows."""
    out: dict[str, dict[str, Any]] = {}
    for key in sorted({(r["dtype"], r["path"]) for r in runs}):
        rs = [r for r in runs if (r["dtype"], r["path"]) == key]

        def span(values: list[float | None]) -> list[float] | None:
            vals = [v for v in values if v is not None]
            return [min(vals), max(vals)] if vals else None

        out[f"{key[0]} {key[1]}"] = {
            "runs": len(rs), "median_sync_s": span([r["median_sync_s"] for r in rs]),
            "median_sync_over_train": span([r["median_sync_over_train"] for r in rs]),
            "median_train_s": span([r["median_train_s"] for r in rs]),
            "base_sync_s": span([round(r["base"]["save_s"] + r["base"]["hot_load_s"], 4) for r in rs]),
            "per_step_sync_s": span([x["sync_s"] for r in rs for x in r["rows"][1:]]),
            "max_wait_for_durable_s": max(x["waited_for_previous_durable_s"] for r in rs for x in r["rows"])}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="firetitan/tiny-qwen3")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--paths", default="shm,file", help="shm (same host) and/or file (snapshot files)")
    parser.add_argument("--repeats", type=int, default=1, help="run every configuration this many times")
    parser.add_argument("--append", action="store_true", help="add these runs to the --out file's")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--synthetic-smollm2", action="store_true",
                        help="SmolLM2-135M shapes with random weights instead of --model")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.synthetic_smollm2:
            args.model = synthetic_smollm2(Path(tmp) / "synthetic-smollm2-135m")
        for repeat in range(args.repeats):
            for dtype in args.dtypes.split(","):
                for path in args.paths.split(","):
                    runs.append({"repeat": repeat, **run(args.model, dtype, path, args.steps, args.lr,
                                                         Path(tmp) / str(repeat))})
    builtin = args.model.startswith("firetitan/")
    out = args.out or RESULTS / ("weight_sync.json" if builtin else f"weight_sync_{Path(args.model).name}.json")
    if args.synthetic_smollm2:
        args.model = "synthetic SmolLM2-135M shapes (LlamaForCausalLM, random init)"
    result = {"benchmark": "weight_sync", "model": args.model, "lr": args.lr, "threads": args.threads,
              "batch": "8 x 64 random tokens, cross_entropy, AdamW", "paths": args.paths.split(","),
              "torch": torch.__version__, "machine": platform.machine(),
              "load_average": os.getloadavg(), "cpus": os.cpu_count(),
              "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "runs": runs}
    if args.append and out.is_file():  # one machine-friendly invocation per configuration, one file
        result["runs"] = json.loads(out.read_text())["runs"] + runs
    result["spread"] = spread(result["runs"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    for key, sp in result["spread"].items():
        print(f"{key}: sync after the base {sp['median_sync_s']} s (median per run, min-max over {sp['runs']} runs), "
              f"{sp['median_sync_over_train']}x the train step {sp['median_train_s']} s")
    for r in runs:
        print(f"{r['dtype']} {r['path']}: train {r['median_train_s']}s; base save {r['base']['save_s']}s + load "
              f"{r['base']['hot_load_s']}s; after the base: sync {r['median_sync_s']}s = "
              f"{r['median_sync_over_train']}x the train step (median); served == trainer: "
              f"{r['served_equals_trainer']}, durable == trainer: {r['durable_equals_trainer']}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
