"""`python -m firetitan.server.control_plane`: the control plane process (daemon or foreground)."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable

from firetitan.devices import check_device, check_dtype
from firetitan.errors import ConfigError, InvalidRequestError
from firetitan.server.common import add_common_args
from firetitan.server.control_plane.controller import Settings
from firetitan.server.control_plane.home import resolve_home
from firetitan.server.control_plane.server import resolve_api_key, run_server


def add_server_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--home", default=None, help="state directory (default $FIRETITAN_HOME or the user cache)")
    env = os.environ.get
    parser.add_argument("--trainer-idle-timeout", type=float,
                        default=float(env("FIRETITAN_TRAINER_IDLE_TIMEOUT", "3600")),
                        help="stop a trainer after this many seconds without requests (resumable)")
    parser.add_argument("--health-interval", type=float, default=2.0, help="seconds between worker health checks")
    parser.add_argument("--cpus", type=int, default=None, help="cores to split between trainers and replicas")
    parser.add_argument("--trainer-threads", type=int, default=_env_int("FIRETITAN_TRAINER_THREADS"))
    parser.add_argument("--replica-threads", type=int, default=_env_int("FIRETITAN_REPLICA_THREADS"))
    parser.add_argument("--exit-when-idle", type=float, default=0.0,
                        help="exit after this many seconds with no workers and no requests (0 = never)")
    parser.add_argument("--worker-grace", type=float, default=15.0,
                        help="seconds workers outlive a crashed control plane, waiting to be adopted")
    parser.add_argument("--provisioner", choices=["local", "ray"], default=env("FIRETITAN_PROVISIONER", "local"),
                        help="where workers run: local subprocesses, or Ray actors (needs firetitan[ray])")
    parser.add_argument("--ray-address", default=env("FIRETITAN_RAY_ADDRESS") or None,
                        help="the Ray cluster for --provisioner ray (default: start a local one)")
    parser.add_argument("--ray-gpus-per-worker", type=float, default=float(env("FIRETITAN_RAY_GPUS_PER_WORKER", "0")),
                        help="num_gpus each worker's Ray actor requests")
    parser.add_argument("--device", default=env("FIRETITAN_DEVICE") or None, type=_flag(check_device),
                        help="default device of trainer jobs and deployments: auto|cpu|cuda[:i]|mps")
    parser.add_argument("--dtype", default=env("FIRETITAN_DTYPE") or None, type=_flag(check_dtype),
                        help="default dtype of trainer jobs and deployments: float32|bfloat16")


def _flag(check: Callable[[str], str]) -> Callable[[str], str]:
    """An argparse type from a setting validator: a bad value is a usage error, not a traceback."""
    def parse(value: str) -> str:
        try:
            return check(value)
        except InvalidRequestError as exc:
            raise argparse.ArgumentTypeError(exc.message) from None
    return parse


def _env_int(name: str) -> int | None:
    raw = os.environ.get(name)
    return int(raw) if raw else None


def settings_from_args(args: argparse.Namespace) -> Settings:
    settings = Settings(trainer_idle_timeout=args.trainer_idle_timeout, health_interval=args.health_interval,
                        idle_check_interval=min(5.0, max(0.5, args.trainer_idle_timeout / 4)),
                        trainer_threads=args.trainer_threads, replica_threads=args.replica_threads,
                        worker_host="127.0.0.1", exit_when_idle=args.exit_when_idle,
                        worker_grace_s=args.worker_grace, provisioner=args.provisioner,
                        ray_address=args.ray_address, ray_gpus_per_worker=args.ray_gpus_per_worker,
                        device=args.device, dtype=args.dtype)
    if args.cpus:
        settings.cpus = args.cpus
    return settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m firetitan.server.control_plane")
    add_common_args(parser)
    add_server_args(parser)
    args = parser.parse_args(argv)
    from firetitan.logging import configure_logging

    configure_logging(args.log_level)
    layout = resolve_home(args.home).ensure()
    try:
        api_key = resolve_api_key(layout, args.host, args.api_key)
        asyncio.run(run_server(layout, settings_from_args(args), host=args.host, port=args.port,
                               api_key=api_key, ready_file=args.ready_file))
    except ConfigError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return int(getattr(exc, "exit_code", 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
