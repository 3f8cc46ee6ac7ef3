"""`python -m firetitan.server.trainer`: start a trainer worker process (flags in docs/contracts.md)."""

from __future__ import annotations

import argparse
import asyncio
import os
from collections.abc import Callable
from pathlib import Path

from firetitan.server.common import add_common_args, serve_app


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m firetitan.server.trainer", description=__doc__)
    add_common_args(parser)
    parser.add_argument("--store-dir", type=Path, required=True, help="sampler snapshot store (shared)")
    parser.add_argument("--state-dir", type=Path, required=True, help="where train states (DCP) are written")
    parser.add_argument("--base-model", default=None, help="preload this model at startup")
    parser.add_argument("--lora-rank", type=int, default=0, help="LoRA rank of the preloaded model (0 = full)")
    parser.add_argument("--job-id", default=None, help="model id of the preloaded model")
    parser.add_argument("--forward-only", action="store_true",
                        help="reference mode: forward passes only; optim/save requests are refused")
    parser.add_argument("--max-models", type=int, default=8, help="models held at once (create_model beyond: 409)")
    parser.add_argument("--model-root", type=Path, action="append", default=[],
                        help="create_model may load local model directories under this root (repeatable)")
    parser.add_argument("--autosave-every", type=int, default=10,
                        help="save the job model's latest train state every N optimizer steps (0 = off)")
    parser.add_argument("--autosave-keep", type=int, default=2, help="latest train states kept (newest)")
    parser.add_argument("--device", default="auto", help="auto|cpu|cuda[:i]|mps (auto: cuda, else mps, else cpu)")
    parser.add_argument("--dtype", default="float32",
                        help="float32|bfloat16: compute and sampler-snapshot dtype (weights and Adam stay float32)")
    parser.add_argument("--world-size", type=int, default=1,
                        help="data-parallel ranks of the preloaded model (1..8; this process is rank 0 and "
                             "starts the others, see docs/data-parallel-trainer.md)")
    args = parser.parse_args(argv)
    from firetitan.server.trainer.distributed import MAX_WORLD_SIZE

    if not 1 <= args.world_size <= MAX_WORLD_SIZE:
        parser.error(f"--world-size: {args.world_size} is not in 1..{MAX_WORLD_SIZE}")
    if args.world_size > 1 and (args.base_model is None or args.lora_rank):
        parser.error("--world-size > 1 needs --base-model (the job model is the one sharded) and --lora-rank 0")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from firetitan.devices import check_dtype, resolve_device
    from firetitan.logging import configure_logging
    from firetitan.server.trainer.app import TrainerSettings, build_app

    configure_logging(args.log_level)
    device = resolve_device(args.device, field="--device")  # fails here, before serving, if absent
    dtype = check_dtype(args.dtype, field="--dtype")
    if args.threads:
        torch.set_num_threads(args.threads)
        torch.set_num_interop_threads(max(1, min(args.threads, 2)))
    settings = TrainerSettings(store_dir=args.store_dir, state_dir=args.state_dir, base_model=args.base_model,
                               lora_rank=args.lora_rank, job_id=args.job_id, forward_only=args.forward_only,
                               api_key=args.api_key, max_models=args.max_models,
                               model_roots=tuple(args.model_root), autosave_every=args.autosave_every,
                               autosave_keep=args.autosave_keep, resolve_model=_alias_resolver(),
                               device=device, dtype=dtype)
    if args.world_size > 1:
        from firetitan.server.trainer.distributed.engine import engine_factory

        rank_args = (["--log-level", args.log_level] if args.log_level else []) + (
            ["--threads", str(args.threads)] if args.threads else [])
        settings.make_engine = engine_factory(args.world_size, torch.device(device), rank_args)
    asyncio.run(serve_app(build_app(settings), args.host, args.port, args.ready_file))


def _alias_resolver() -> Callable[[str], str] | None:
    """Hosted model names (`accounts/fireworks/models/...`) through the alias table of this worker's
    state directory ($FIRETITAN_HOME, set by the control plane that started it); None without one."""
    home = os.environ.get("FIRETITAN_HOME")
    if not home:
        return None
    from firetitan.models.aliases import is_hosted_name, resolve_model_name

    return lambda name: resolve_model_name(name, home) if is_hosted_name(name) else name


if __name__ == "__main__":
    main()
