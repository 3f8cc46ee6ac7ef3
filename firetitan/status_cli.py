"""`firetitan status`: the trainer jobs and deployments of the local (or a remote) control plane."""

from __future__ import annotations

import argparse
import json

from firetitan.cli import register_command


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
    from firetitan.home import read_api_key, resolve_home, running_control_plane

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
    summary = None
    if args.base_url is None:  # the store is a local directory: only the local control plane's is ours to measure
        from firetitan.checkpoints import SnapshotStore
        from firetitan.checkpoints.retention import store_summary

        summary = store_summary(SnapshotStore(layout.store))
    if args.json:
        print(json.dumps({"url": url, "rlorTrainerJobs": jobs, "deployments": deps, "store": summary}, indent=2))
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
    if summary is not None:
        console.print(f"snapshot store: {summary['snapshots']} snapshots ({summary['pinned']} pinned), "
                      f"{summary['bytes'] / 2**20:.1f} MiB on disk at {layout.store}")
    return 0


register_command("status", "list trainer jobs and deployments of the local (or a remote) control plane",
                 _status_args, _status)
