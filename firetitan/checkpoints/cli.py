"""`firetitan store ls | gc | pin | unpin | du`: look at and prune a state directory's snapshot store."""

from __future__ import annotations

import argparse
import json

from firetitan.cli import register_command


def _add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--home", default=None, help="state directory (default $FIRETITAN_HOME or the user cache)")
    sub = parser.add_subparsers(dest="store_command", required=True)
    ls = sub.add_parser("ls", help="list snapshots with run, size, pin and whether gc would keep them")
    ls.add_argument("--json", action="store_true", help="one JSON object per line")
    gc = sub.add_parser("gc", help="delete snapshots outside the keep set (last K per run, pins, served, chains)")
    gc.add_argument("--keep-last", type=int, default=None,
                    help="snapshots kept per run (default $FIRETITAN_STORE_KEEP_LAST or 8)")
    gc.add_argument("--dry-run", action="store_true", help="say what would be deleted, delete nothing")
    for name, text in (("pin", "keep a snapshot through every gc"), ("unpin", "let gc consider it again")):
        p = sub.add_parser(name, help=text)
        p.add_argument("identity")
    sub.add_parser("du", help="bytes the snapshot store takes on disk")


def _run(args: argparse.Namespace) -> int:
    from firetitan.checkpoints.retention import (
        disk_usage_bytes,
        gc,
        in_use_from_state_db,
        pin,
        pinned,
        plan_gc,
        run_of,
        unpin,
    )
    from firetitan.checkpoints.store import SnapshotStore
    from firetitan.errors import FiretitanError
    from firetitan.server.control_plane.home import resolve_home

    layout = resolve_home(args.home)
    store = SnapshotStore(layout.store)
    try:
        if args.store_command == "ls":
            plan = plan_gc(store, in_use=in_use_from_state_db(layout.state_db))
            pins = pinned(store)
            for m in store.list():
                row = {"identity": m.identity, "kind": m.kind, "run": run_of(m), "size_bytes": m.size_bytes,
                       "created_at": m.created_at.isoformat(), "base": m.previous_snapshot_identity,
                       "pinned": m.identity in pins, "gc": plan.keep.get(m.identity, "deletable")}
                if args.json:
                    print(json.dumps(row))
                else:
                    print(f"{row['identity']:<48} {row['kind']:<5} {_human(row['size_bytes']):>9}  "
                          f"{row['created_at'][:19]}  {row['gc']}")
        elif args.store_command == "gc":
            plan = gc(store, keep_last=args.keep_last, in_use=in_use_from_state_db(layout.state_db),
                      dry_run=args.dry_run)
            verb = "would delete" if args.dry_run else "deleted"
            for identity in plan.delete:
                print(f"{verb} {identity}")
            print(f"{verb} {len(plan.delete)} snapshots ({_human(plan.freed_bytes)}), kept {len(plan.keep)}")
        elif args.store_command == "pin":
            pin(store, args.identity)
            print(f"pinned {args.identity}")
        elif args.store_command == "unpin":
            print(f"unpinned {args.identity}" if unpin(store, args.identity) else f"{args.identity} was not pinned")
        else:
            print(disk_usage_bytes(store.root))
    except FiretitanError as exc:
        print(f"error: {exc.message}")
        return 2
    return 0


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


register_command("store", "list, pin and garbage-collect sampler snapshots (firetitan store -h)", _add_args, _run)
