"""`python -m firetitan.server.deployment.vllm_backend`: a deployment worker whose engine is a `vllm serve` child."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import tempfile
from pathlib import Path

from firetitan.server.common import add_common_args, serve_app


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m firetitan.server.deployment.vllm_backend", description=__doc__)
    add_common_args(parser)
    parser.add_argument("--store-dir", type=Path, default=None, help="snapshot store to hot-load from (shared)")
    parser.add_argument("--base-model", default="firetitan/tiny-qwen3",
                        help="built-in name (exported to an HF directory for vLLM) or a local HF directory")
    parser.add_argument("--deployment-id", default="deployment")
    parser.add_argument("--replica-index", type=int, default=0)
    parser.add_argument("--max-running-seqs", type=int, default=64, help="vLLM --max-num-seqs")
    parser.add_argument("--max-model-len", type=int, default=2048, help="vLLM --max-model-len (context bound)")
    parser.add_argument("--max-cached-tokens", type=int, default=None,
                        help="accepted for the embedded worker's flag set; caps --max-model-len (vLLM's KV "
                             "cache itself is bounded by --kv-cache-gib)")
    parser.add_argument("--kv-cache-gib", type=int, default=1, help="VLLM_CPU_KVCACHE_SPACE (CPU KV cache)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-waiting-requests", type=int, default=1024,
                        help="choices queued beyond the running ones before answering 429 with Retry-After")
    parser.add_argument("--max-choices-per-request", type=int, default=128, help="prompts x n in one request")
    parser.add_argument("--vllm-python", default=None,
                        help="interpreter with vllm installed (default $FIRETITAN_VLLM_PYTHON, then .venv-vllm)")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="exported model, prepared snapshots and the vLLM log (default: a temp dir)")
    parser.add_argument("--vllm-arg", action="append", default=[], help="extra `vllm serve` argument (repeat)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.max_cached_tokens is not None:
        args.max_model_len = min(args.max_model_len, args.max_cached_tokens)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from firetitan.logging import configure_logging, get_logger
    from firetitan.models import export_model
    from firetitan.models.registry import is_builtin
    from firetitan.server.deployment.app import DeploymentSettings, build_app
    from firetitan.server.deployment.vllm_backend.child import VllmChild, VllmOptions, vllm_python
    from firetitan.server.deployment.vllm_backend.engine import vllm_serving

    configure_logging(args.log_level, capture_stdlib=True)
    python = vllm_python(args.vllm_python)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix=f"firetitan-vllm-{args.deployment_id}-"))
    work.mkdir(parents=True, exist_ok=True)
    if is_builtin(args.base_model):
        model_dir = work / "model"
        if not (model_dir / "config.json").is_file():
            export_model(args.base_model, model_dir)
    else:
        model_dir = Path(args.base_model).resolve()
    options = VllmOptions(model_dir=model_dir, served_name=args.deployment_id, max_num_seqs=args.max_running_seqs,
                          max_model_len=args.max_model_len, threads=args.threads, kv_cache_gib=args.kv_cache_gib,
                          seed=args.seed, extra_args=list(args.vllm_arg))
    child = VllmChild(python, options, work / "vllm.log")
    get_logger("firetitan.deployment.vllm").info("starting_vllm", argv=" ".join(child.argv()))
    # The embedded worker's settings and routes; the context bound is vLLM's --max-model-len.
    settings = DeploymentSettings(base_model=args.base_model, deployment_id=args.deployment_id,
                                  store_dir=args.store_dir, replica_index=args.replica_index,
                                  max_running_seqs=args.max_running_seqs, max_cached_tokens=args.max_model_len,
                                  api_key=args.api_key, seed=args.seed,
                                  max_waiting_requests=args.max_waiting_requests,
                                  max_choices_per_request=args.max_choices_per_request)

    async def run() -> None:
        try:
            await child.start()
            await child.label_version(args.base_model)
            serving = vllm_serving(child, model_dir=model_dir, base_model=args.base_model,
                                   served_name=args.deployment_id, max_model_len=args.max_model_len,
                                   scratch=work / "scratch")
            await serve_app(build_app(settings, serving), args.host, args.port, args.ready_file,
                            extra_ready={"backend": "vllm", "vllm_url": child.url})
        finally:
            child.stop()

    asyncio.run(run())
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
