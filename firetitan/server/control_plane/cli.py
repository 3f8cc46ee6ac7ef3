"""`firetitan serve` (the control plane in the foreground) and `firetitan status` (jobs, deployments)."""

from __future__ import annotations

import argparse
import asyncio
import json

from firetitan.cli import register_command


def _serve_args(parser: argparse.ArgumentParser) -> None:
    from firetitan.server.control_plane.__main__ import add_server_args

    parser.add_argument("--host", default="127.0.0.1", help="bind address; off loopback an API key is required")
    parser.add_argument("--port", type=int, default=8700)
    parser.add_argument("--api-key", default=None, help="required off loopback (or $FIRETITAN_API_KEY)")
    add_server_args(parser)


def _serve(args: argparse.Namespace) -> int:
    from firetitan.errors import ConfigError
    from firetitan.server.control_plane.__main__ import settings_from_args
    from firetitan.server.control_plane.home import resolve_home
    from firetitan.server.control_plane.server import resolve_api_key, run_server

    layout = resolve_home(args.home).ensure()
    try:
        api_key = resolve_api_key(layout, args.host, args.api_key)
        print(f"firetitan control plane for {layout.root} on http://{args.host}:{args.port} "
              f"(API key in {layout.api_key_file if not args.api_key else 'the --api-key flag'})", flush=True)
        asyncio.run(run_server(layout, settings_from_args(args), host=args.host, port=args.port, api_key=api_key))
    except ConfigError as exc:
        print(f"error: {exc.message}")
        return int(getattr(exc, "exit_code", 2))
    return 0


def _status_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--home", default=None, help="state directory (default $FIRETITAN_HOME or the user cache)")
    parser.add_argument("--base-url", default=None, help="a remote control plane instead of the local one")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--account", default="local")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


async def _status(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from firetitan.client.http import HttpClient
    from firetitan.server.control_plane.home import read_api_key, resolve_home, running_control_plane

    layout = resolve_home(args.home)
    url = args.base_url or running_control_plane(layout)
    if url is None:
        print(f"no control plane is running for {layout.root}")
        return 1
    http = HttpClient(url, args.api_key or read_api_key(layout), timeout=10.0)
    try:
        jobs = (await http.request_json("GET", f"/v1/accounts/{args.account}/rlorTrainerJobs"))["rlorTrainerJobs"]
        deps = (await http.request_json("GET", f"/v1/accounts/{args.account}/deployments"))["deployments"]
    finally:
        await http.close()
    if args.json:
        print(json.dumps({"url": url, "rlorTrainerJobs": jobs, "deployments": deps}, indent=2))
        return 0
    console = Console()
    console.print(f"control plane: {url}  (state: {layout.root})")
    table = Table("trainer job", "state", "base model", "lora", "message", title="trainer jobs")
    for j in jobs:
        cfg = j.get("trainingConfig", {})
        table.add_row(j["name"].rsplit("/", 1)[-1], j["state"].removeprefix("JOB_STATE_"), cfg.get("baseModel", ""),
                      str(cfg.get("loraRank", 0)), (j.get("status") or {}).get("message", "")[:60])
    console.print(table)
    table = Table("deployment", "state", "base model", "replicas", "snapshot", title="deployments")
    for d in deps:
        table.add_row(d["name"].rsplit("/", 1)[-1], d["state"], d["baseModel"],
                      f"{d.get('replicaCount', 0)}/{d.get('maxReplicaCount', 0)}",
                      d.get("currentSnapshotIdentity") or "-")
    console.print(table)
    return 0


register_command("serve", "run the control plane in the foreground", _serve_args, _serve)
register_command("status", "list trainer jobs and deployments of the local (or a remote) control plane",
                 _status_args, _status)
