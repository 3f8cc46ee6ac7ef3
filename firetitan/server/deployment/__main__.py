"""`python -m firetitan.server.deployment`: start a deployment worker process (flags in docs/contracts.md)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

from firetitan.server.common import add_common_args, serve_app


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m firetitan.server.deployment", description=__doc__)
    add_common_args(parser)
    parser.add_argument("--store-dir", type=Path, default=None, help="snapshot store to hot-load from (shared)")
    parser.add_argument("--base-model", default="firetitan/tiny-qwen3", help="model served at startup")
    parser.add_argument("--deployment-id", default="deployment")
    parser.add_argument("--replica-index", type=int, default=0)
    parser.add_argument("--max-running-seqs", type=int, default=64, help="decode batch limit")
    parser.add_argument("--max-cached-tokens", type=int, default=65536,
                        help="admission budget: sum of prompt + max_tokens over running requests")
    parser.add_argument("--seed", type=int, default=0, help="sampler seed for requests without their own")
    parser.add_argument("--max-waiting-requests", type=int, default=1024,
                        help="choices queued beyond the running ones before answering 429 with Retry-After")
    parser.add_argument("--max-choices-per-request", type=int, default=128, help="prompts x n in one request")
    parser.add_argument("--max-prefill-tokens", type=int, default=4096, help="prompt tokens prefilled per step")
    parser.add_argument("--max-kv-tokens", type=int, default=None,
                        help="KV cache memory bound, in positions over all rows (slots + 1); caps the context")
    parser.add_argument("--device", default="auto", help="auto|cpu|cuda[:i]|mps (auto: cuda, else mps, else cpu)")
    parser.add_argument("--dtype", default="float32", help="float32|bfloat16: the served weights' dtype")
    parser.add_argument("--batch-packs", type=int, default=1,
                        help="copies of the weights packed for a recurring decode batch size (float32 CPU; 0: none)")
    # --small-batch-kernel: its name while the kernel served decode batches of 1-7 only; still accepted.
    parser.add_argument("--native-matmul", "--small-batch-kernel", dest="native_matmul", choices=("on", "off"),
                        default="on", help="offer decode and prefill the native row-blocked matmul (float32 CPU; "
                                           "built with gcc on first use, cached)")
    parser.add_argument("--fused-decode", choices=("on", "off"), default="on",
                        help="run the decode step's attention, norms and residual adds as native fused calls "
                             "(float32 CPU; built with gcc on first use, cached)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from firetitan.heap import keep_freed_memory

    keep_freed_memory()  # before torch allocates: a forward's large activations reuse heap memory
    import torch

    from firetitan.devices import check_dtype, resolve_device
    from firetitan.logging import configure_logging
    from firetitan.server.deployment.app import DeploymentSettings, build_app
    from firetitan.server.deployment.engine import DecodeOptions

    configure_logging(args.log_level, capture_stdlib=True)
    device = resolve_device(args.device, field="--device")  # fails here, before serving, if absent
    dtype = check_dtype(args.dtype, field="--dtype")
    from firetitan.torch_threads import serial

    threads = args.threads or torch.get_num_threads()
    if args.threads:
        torch.set_num_interop_threads(max(1, min(args.threads, 2)))
    serial()  # before the model loads: the engine thread takes the only OpenMP team (firetitan.torch_threads)
    settings = DeploymentSettings(base_model=args.base_model, deployment_id=args.deployment_id,
                                  store_dir=args.store_dir, replica_index=args.replica_index,
                                  max_running_seqs=args.max_running_seqs, max_cached_tokens=args.max_cached_tokens,
                                  api_key=args.api_key, seed=args.seed,
                                  max_waiting_requests=args.max_waiting_requests,
                                  max_choices_per_request=args.max_choices_per_request,
                                  max_prefill_tokens=args.max_prefill_tokens, max_kv_tokens=args.max_kv_tokens,
                                  device=device, dtype=dtype, threads=threads,
                                  decode=DecodeOptions(batch_packs=args.batch_packs,
                                                       native_matmul=args.native_matmul == "on",
                                                       fused_decode=args.fused_decode == "on"))
    torch.set_grad_enabled(False)  # a serving process never trains (the engine thread also runs under no_grad)
    asyncio.run(serve_app(build_app(settings), args.host, args.port, args.ready_file))
    # Everything is shut down by now (engine thread joined, app cleaned up). Skip the interpreter's
    # module teardown, which takes seconds with torch + transformers loaded, so a stop is prompt.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
