"""`python -m firetitan.server.trainer.distributed.rank`: one of ranks 1..N-1 of a data-parallel trainer.

Started by rank 0 (the trainer worker), never by hand: joins the group, builds and shards the same
model, then runs rank 0's operations until told to stop or until rank 0 is gone.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m firetitan.server.trainer.distributed.rank", description=__doc__)
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world-size", type=int, required=True)
    parser.add_argument("--port", type=int, required=True, help="rank 0's rendezvous store on 127.0.0.1")
    parser.add_argument("--model-id", required=True)
    parser.add_argument("--spec", required=True, help="the model spec as JSON (base_model, forward_only, seed)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--log-level", default="info")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from firetitan.server.trainer.distributed.group import join_group, watch_parent

    parent = int(os.environ.get("FIRETITAN_PARENT_PID") or os.getppid())
    watch_parent(parent)  # before anything slow: rank 0 may die while we load
    import torch

    from firetitan.logging import configure_logging, get_logger
    from firetitan.server.trainer.distributed.engine import DistributedEngine
    from firetitan.server.trainer.engine import ModelSpec

    configure_logging(args.log_level)
    log = get_logger("firetitan.server.trainer.distributed")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    spec = ModelSpec(**json.loads(args.spec))
    group = join_group(args.rank, args.world_size, args.port, device)
    engine = DistributedEngine(args.model_id, spec, store=None, states=None, group=group)
    log.info("rank_ready", rank=args.rank, world_size=args.world_size, pid=os.getpid())
    try:
        engine.serve()  # returns never: rank 0's exit ends this process through the watchdog
    except Exception:
        log.exception("rank_failed", rank=args.rank)
        sys.stdout.flush()
        os._exit(1)


if __name__ == "__main__":
    main()
