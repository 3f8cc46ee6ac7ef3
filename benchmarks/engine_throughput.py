"""Benchmark: continuous-batching engine throughput vs per-request `generate` and a static batch decode loop.

Same command, same model, same prompts, same number of output tokens per request (EOS ignored):

- engine: all requests submitted at once to the deployment `Engine` (in-process, its own thread),
  limited to `--concurrency` running sequences;
- generate loop: `model.generate` once per request, one after another (measured over
  `--generate-requests` of them; its tokens/s does not depend on how many are timed);
- static batch: the whole batch left-padded, one prefill, then a plain decode loop on the transformers
  model with its KV cache (`DynamicCache`), sampling every row each step;
- vLLM (only when `$FIRETITAN_VLLM_PYTHON` names a vLLM environment's python, e.g. `.venv-vllm/bin/python`
  from `make vllm-env`): `vllm serve` on the same model (a built-in is exported as an HF directory), the
  same prompts all sent at once over OpenAI `/v1/completions` (`ignore_eos`, temperature 1), at most
  `--concurrency` running (`--max-num-seqs`), with `--threads` CPU threads. It is measured over HTTP, the
  embedded engine in-process: the HTTP cost is vLLM's handicap here (benchmarks/engine_vs_vllm.py compares
  both over HTTP).

    .venv/bin/python benchmarks/engine_throughput.py [--model firetitan/tiny-qwen3] [--concurrency 64]
        [--max-tokens 64] [--threads 1]
    FIRETITAN_VLLM_PYTHON=.venv-vllm/bin/python .venv/bin/python benchmarks/engine_throughput.py ...  # + vLLM

Writes benchmarks/results/engine_throughput.json (tokens/s of each, and the ratios).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from firetitan.models import load_model, load_tokenizer
from firetitan.server.deployment.engine import Engine, EngineRequest, SamplingOptions, StepOutput
from firetitan.torch_threads import own_pool, serial

RESULTS = Path(__file__).resolve().parent / "results" / "engine_throughput.json"


def make_prompts(count: int, seed: int, vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(16, 65, (count,), generator=gen).tolist()
    return [[1, *torch.randint(3, vocab, (n - 1,), generator=gen).tolist()] for n in lengths]


def on_own_thread(threads: int, fn: Any, *args: Any) -> Any:
    """`fn(*args)` on a fresh thread that takes `threads` torch threads and exits after (its OpenMP team
    goes with it), so each contender runs with the only team in the process (`firetitan.torch_threads`)."""
    result: list[Any] = []

    def target() -> None:
        own_pool(threads)
        result.append(fn(*args))

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if not result:
        raise RuntimeError(f"{getattr(fn, '__name__', fn)} failed (see the traceback above)")
    return result[0]


def run_engine(model: torch.nn.Module, tokenizer: Any, prompts: list[list[int]], max_tokens: int,
               concurrency: int, threads: int | None = None) -> dict[str, Any]:
    done = threading.Event()
    remaining = [len(prompts)]
    produced = [0]
    first_token_at: dict[str, float] = {}

    def emit(outputs: list[tuple[EngineRequest, StepOutput]]) -> None:
        for request, out in outputs:
            produced[0] += len(out.tokens)
            first_token_at.setdefault(request.request_id, time.perf_counter())
            if out.finish_reason is not None:
                remaining[0] -= 1
        if remaining[0] == 0:
            done.set()

    engine = Engine(model, tokenizer, emit=emit, policy_version="bench", max_running_seqs=concurrency,
                    max_cached_tokens=concurrency * (max(len(p) for p in prompts) + max_tokens), threads=threads)
    engine.start()
    try:
        # Warm-up (allocations, first-call overheads) outside the timing.
        remaining[0] = 1
        engine.submit(EngineRequest("warmup", prompts[0], SamplingOptions(max_tokens=4, ignore_eos=True)))
        done.wait(120)
        done.clear()
        remaining[0], produced[0] = len(prompts), 0
        started = time.perf_counter()
        for i, prompt in enumerate(prompts):
            engine.submit(EngineRequest(f"r{i}", prompt, SamplingOptions(max_tokens=max_tokens, seed=i,
                                                                         ignore_eos=True)))
        if not done.wait(3600):
            raise RuntimeError("engine benchmark did not finish")
        elapsed = time.perf_counter() - started
    finally:
        engine.stop()
    ttfts = sorted(first_token_at[f"r{i}"] - started for i in range(len(prompts)))
    return {"seconds": elapsed, "output_tokens": produced[0], "tokens_per_s": produced[0] / elapsed,
            "ttft_p50_s": ttfts[len(ttfts) // 2], "steps": engine.stats.steps}


@torch.no_grad()
def run_generate_loop(model: torch.nn.Module, prompts: list[list[int]], max_tokens: int) -> dict[str, Any]:
    kwargs = {"max_new_tokens": max_tokens, "min_new_tokens": max_tokens, "do_sample": True, "top_k": 0,
              "top_p": 1.0, "temperature": 1.0, "pad_token_id": 0}
    model.generate(torch.tensor([prompts[0]]), **{**kwargs, "max_new_tokens": 4, "min_new_tokens": 4})
    produced = 0
    started = time.perf_counter()
    for prompt in prompts:
        out = model.generate(torch.tensor([prompt]), **kwargs)
        produced += out.shape[1] - len(prompt)
    elapsed = time.perf_counter() - started
    return {"seconds": elapsed, "output_tokens": produced, "tokens_per_s": produced / elapsed,
            "requests_timed": len(prompts)}


@torch.no_grad()
def run_static_batch(model: torch.nn.Module, prompts: list[list[int]], max_tokens: int) -> dict[str, Any]:
    """Left-padded batch, one prefill, then `max_tokens` decode steps with the transformers KV cache."""
    from transformers import DynamicCache

    def once(batch: list[list[int]], steps: int) -> int:
        longest = max(len(p) for p in batch)
        ids = torch.zeros((len(batch), longest), dtype=torch.long)
        mask = torch.zeros((len(batch), longest), dtype=torch.long)
        for row, prompt in enumerate(batch):
            ids[row, longest - len(prompt):] = torch.tensor(prompt)
            mask[row, longest - len(prompt):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=model.config)
        gen = torch.Generator().manual_seed(0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache,
                       use_cache=True).logits[:, -1]
        produced = 0
        for _ in range(steps):
            probs = torch.softmax(logits.float(), dim=-1)
            nxt = torch.multinomial(probs, 1, generator=gen)
            produced += len(batch)
            mask = torch.cat([mask, torch.ones((len(batch), 1), dtype=torch.long)], dim=1)
            positions = positions[:, -1:] + 1
            logits = model(input_ids=nxt, attention_mask=mask, position_ids=positions, cache=cache,
                           use_cache=True).logits[:, -1]
        return produced

    once(prompts[:2], 2)
    started = time.perf_counter()
    produced = once(prompts, max_tokens)
    elapsed = time.perf_counter() - started
    return {"seconds": elapsed, "output_tokens": produced, "tokens_per_s": produced / elapsed}


def run_vllm(vllm_python: str, model_name: str, prompts: list[list[int]], max_tokens: int, concurrency: int,
             threads: int, repeats: int) -> dict[str, Any]:
    """Best of `repeats` rounds of all `prompts` at once against `vllm serve` (after one warm-up round)."""
    import engine_vs_vllm as ev  # this directory's vLLM launcher and load generator (on sys.path as a script)

    longest = max(len(p) for p in prompts) + max_tokens
    opts = argparse.Namespace(vllm_python=vllm_python, threads=threads, vllm_cpu_bind=None, vllm_kv_gib=1,
                              vllm_preload="auto", max_model_len=max(1024, longest))
    with tempfile.TemporaryDirectory(prefix="ft-bench-vllm-") as scratch:
        directory = ev.model_dir(model_name, Path(scratch))
        server = ev.start_vllm(directory, opts, Path(scratch), concurrency)
        try:
            asyncio.run(server.wait_ready(900.0))
            asyncio.run(ev.one_level(server.url, prompts[:concurrency], concurrency, 4))  # warm-up
            runs = [asyncio.run(ev.one_level(server.url, prompts, concurrency, max_tokens)) for _ in range(repeats)]
        finally:
            server.stop()
    best = max(runs, key=lambda r: r["tok_s"])
    return {"seconds": best["seconds"], "output_tokens": best["completion_tokens"], "tokens_per_s": best["tok_s"],
            "transport": "HTTP /v1/completions", "vllm_python": vllm_python}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="firetitan/tiny-qwen3")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--generate-requests", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2, help="best of N for each contender")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    serial()  # the main thread never starts an OpenMP team; each contender's thread takes --threads
    model = load_model(args.model)
    tokenizer = load_tokenizer(args.model)
    prompts = make_prompts(args.concurrency, 0, int(model.config.vocab_size))

    def best(fn: Any, *a: Any) -> dict[str, Any]:
        runs = [fn(*a) for _ in range(args.repeats)]
        return max(runs, key=lambda r: r["tokens_per_s"])

    static = best(on_own_thread, args.threads, run_static_batch, model, prompts, args.max_tokens)
    engine = best(run_engine, model, tokenizer, prompts, args.max_tokens, args.concurrency, args.threads)
    generate = best(on_own_thread, args.threads, run_generate_loop, model, prompts[: args.generate_requests],
                    args.max_tokens)
    vllm_python = os.environ.get("FIRETITAN_VLLM_PYTHON")
    vllm = run_vllm(vllm_python, args.model, prompts, args.max_tokens, args.concurrency, args.threads,
                    args.repeats) if vllm_python else None
    result = {
        "benchmark": "engine_throughput",
        "command": f"python benchmarks/engine_throughput.py --model {args.model} --concurrency {args.concurrency} "
                   f"--max-tokens {args.max_tokens} --threads {args.threads}",
        "model": args.model, "concurrency": args.concurrency, "max_tokens": args.max_tokens,
        "prompt_tokens": [min(len(p) for p in prompts), max(len(p) for p in prompts)],
        "threads": args.threads, "repeats": args.repeats,
        "engine": engine, "generate_loop": generate, "static_batch": static,
        "engine_vs_generate_loop": engine["tokens_per_s"] / generate["tokens_per_s"],
        "engine_vs_static_batch": engine["tokens_per_s"] / static["tokens_per_s"],
        **({"vllm": vllm, "engine_vs_vllm": engine["tokens_per_s"] / vllm["tokens_per_s"]} if vllm else {}),
        "goals": {"engine_vs_generate_loop": ">= 5", "engine_vs_static_batch": ">= 0.8"},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "load_average": os.getloadavg()},
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("engine_vs_generate_loop", "engine_vs_static_batch")}))
    vllm_note = f", vLLM {vllm['tokens_per_s']:.0f} tok/s (HTTP)" if vllm else ""
    print(f"engine {engine['tokens_per_s']:.0f} tok/s, generate loop {generate['tokens_per_s']:.0f} tok/s, "
          f"static batch {static['tokens_per_s']:.0f} tok/s{vllm_note} -> {args.out}")


if __name__ == "__main__":
    main()
