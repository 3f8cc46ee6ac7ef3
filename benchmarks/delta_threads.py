"""Benchmark: delta save and apply at SmolLM2-135M shapes with the per-tensor work on 1 vs 2 threads.

Random bf16/float32 weights with SmolLM2-135M's tensor shapes (no model load), a base saved once, then
deltas of a small relative update, saved and applied with $FIRETITAN_SNAPSHOT_THREADS=1 and =2,
alternating, 2 repeats. Checks each applied delta equals the new weights bit for bit.

    .venv/bin/python benchmarks/delta_threads.py      # writes benchmarks/results/delta_threads.json
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from firetitan.checkpoints import SnapshotStore

torch.set_num_threads(2)
g = torch.Generator().manual_seed(0)
shapes = {"model.embed_tokens.weight": (49152, 576), "model.norm.weight": (576,)}
for i in range(30):
    p = f"model.layers.{i}."
    shapes.update({p+"self_attn.q_proj.weight": (576, 576), p+"self_attn.k_proj.weight": (192, 576),
                   p+"self_attn.v_proj.weight": (192, 576), p+"self_attn.o_proj.weight": (576, 576),
                   p+"mlp.gate_proj.weight": (1536, 576), p+"mlp.up_proj.weight": (1536, 576),
                   p+"mlp.down_proj.weight": (576, 1536), p+"input_layernorm.weight": (576,),
                   p+"post_attention_layernorm.weight": (576,)})
base32 = {k: torch.randn(s, generator=g) * 0.02 for k, s in shapes.items()}
store = SnapshotStore(Path(tempfile.mkdtemp()))
out = {}
for dtype in (torch.bfloat16, torch.float32):
    base = {k: v.to(dtype) for k, v in base32.items()}
    b = store.save_base(f"b-{dtype}".replace("torch.", ""), base, {"model_type": "llama"})
    results = {"1": [], "2": []}
    for rep in range(2):
        for threads in ("1", "2"):
            os.environ["FIRETITAN_SNAPSHOT_THREADS"] = threads
            new = {k: (v + 1e-5 * torch.sign(v) * torch.rand(v.shape, generator=g)).to(dtype) for k, v in base32.items()}
            t0 = time.perf_counter()
            d = store.save_delta(f"d-{dtype}-{rep}-{threads}".replace("torch.", ""), new, b.identity, base_state_dict=base)
            t1 = time.perf_counter()
            sd = store.load_state_dict(d.identity, base, base_identity=b.identity)
            t2 = time.perf_counter()
            assert all(torch.equal(sd[k], new[k]) for k in new)
            results[threads].append({"save_s": round(t1 - t0, 3), "apply_s": round(t2 - t1, 3), "bytes": d.size_bytes})
    out[str(dtype).replace("torch.", "")] = results
    print(dtype, json.dumps(results))
result = {"benchmark": "delta_threads", "cpus": os.cpu_count(), "load_average": os.getloadavg(),
          "machine": platform.machine(), "torch": torch.__version__,
          "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "by_dtype_and_threads": out}
target = Path(__file__).resolve().parent / "results" / "delta_threads.json"
target.write_text(json.dumps(result, indent=1) + "\n")
