"""Snapshot store retention: pins, the keep set (last K per run, pins, in use, chains), gc and disk usage."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from firetitan.checkpoints.manifest import SnapshotManifest
from firetitan.checkpoints.store import SnapshotStore
from firetitan.errors import ConfigError, NotFoundError
from firetitan.logging import get_logger
from firetitan.names import check_name, resolve_under

log = get_logger(__name__)

KEEP_LAST_ENV = "FIRETITAN_STORE_KEEP_LAST"
DEFAULT_KEEP_LAST = 8
# Staging directories of writers that crashed mid-save; a live save finishes well inside this.
STALE_STAGING_S = 3600.0
_PINS_DIR = "pins"
_TMP_PREFIX = ".tmp-"


def keep_last_default() -> int:
    """$FIRETITAN_STORE_KEEP_LAST, else DEFAULT_KEEP_LAST snapshots kept per run."""
    raw = os.environ.get(KEEP_LAST_ENV)
    if not raw:
        return DEFAULT_KEEP_LAST
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"${KEEP_LAST_ENV}={raw!r} is not a whole number", field=KEEP_LAST_ENV) from None
    if value < 1:
        raise ConfigError(f"${KEEP_LAST_ENV} must be at least 1, got {value}", field=KEEP_LAST_ENV)
    return value


def run_of(manifest: SnapshotManifest) -> str:
    """The run a snapshot belongs to: its client suffix (`<name>-<suffix>`), else its own identity.

    Every training client saves under one suffix, so "the last K of a run" is the last K that one
    client published; snapshots saved under a bare name are each their own run (never aged out by others).
    """
    name, identity = manifest.name, manifest.identity
    if name and identity.startswith(name + "-") and len(identity) > len(name) + 1:
        return identity[len(name) + 1:]
    return identity


# ----------------------------------------------------------------------------------------------- pins

def _pins_dir(store: SnapshotStore) -> Path:
    return store.root / _PINS_DIR


def pin(store: SnapshotStore, identity: str) -> None:
    """Keep `identity` through every gc until unpinned (one empty file per pin: no lock, no lost update)."""
    store.manifest(identity)  # NotFoundError for an unknown identity
    path = resolve_under(_pins_dir(store), identity, field="identity")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()


def unpin(store: SnapshotStore, identity: str) -> bool:
    """Remove a pin; False when there was none."""
    path = resolve_under(_pins_dir(store), identity, field="identity")
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True


def pinned(store: SnapshotStore) -> set[str]:
    try:
        return {p.name for p in _pins_dir(store).iterdir() if not p.name.startswith(".")}
    except FileNotFoundError:
        return set()


# ----------------------------------------------------------------------------------- what is in use

def in_use_from_state_db(state_db: Path) -> set[str]:
    """Every snapshot a control plane's deployments serve or will replay into a new replica.

    Read straight from the control plane's SQLite records (read-only), so `firetitan store gc` works
    whether or not the control plane is running.
    """
    if not state_db.exists():
        return set()
    out: set[str] = set()
    db = sqlite3.connect(f"file:{state_db}?mode=ro", uri=True, timeout=10.0)
    try:
        rows = db.execute("SELECT data FROM resources WHERE kind='deployment'").fetchall()
    except sqlite3.OperationalError:
        rows = []
    finally:
        db.close()
    for (raw,) in rows:
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            data = json.loads(raw)
            for record in data.get("snapshotChain") or data.get("snapshot_chain") or []:
                if isinstance(record, dict):
                    for key in ("identity", "previousSnapshotIdentity", "previous_snapshot_identity"):
                        if record.get(key):
                            out.add(str(record[key]))
    return out


# ------------------------------------------------------------------------------------------- the plan

@dataclass
class GcPlan:
    """What a gc keeps (with why) and deletes; `freed_bytes` counts payload sizes from manifests."""

    keep: dict[str, str] = field(default_factory=dict)
    delete: list[str] = field(default_factory=list)
    freed_bytes: int = 0


def plan_gc(store: SnapshotStore, *, keep_last: int | None = None, in_use: Iterable[str] = ()) -> GcPlan:
    """Keep the newest `keep_last` snapshots of every run, pinned ones, `in_use` ones, and every
    snapshot a kept one needs (a delta's base, transitively); everything else is deletable."""
    keep_last = keep_last_default() if keep_last is None else keep_last
    if keep_last < 1:
        raise ConfigError(f"keep_last must be at least 1, got {keep_last}", field="keep_last")
    manifests = {m.identity: m for m in store.list()}
    plan = GcPlan()
    by_run: dict[str, list[SnapshotManifest]] = {}
    for m in manifests.values():
        by_run.setdefault(run_of(m), []).append(m)
    for run, items in by_run.items():
        items.sort(key=lambda m: (m.created_at, m.identity))
        for m in items[-keep_last:]:
            plan.keep.setdefault(m.identity, f"last {keep_last} of run {run}")
    for identity in pinned(store):
        if identity in manifests:
            plan.keep[identity] = "pinned"
    for identity in in_use:
        if identity in manifests:
            plan.keep[identity] = "served by a deployment"
    # Close over chains: a kept delta is useless without its base.
    todo = list(plan.keep)
    while todo:
        prev = manifests[todo.pop()].previous_snapshot_identity
        if prev and prev in manifests and prev not in plan.keep:
            plan.keep[prev] = "base of a kept delta"
            todo.append(prev)
    plan.delete = sorted(i for i in manifests if i not in plan.keep)
    plan.freed_bytes = sum(manifests[i].size_bytes for i in plan.delete)
    return plan


def gc(store: SnapshotStore, *, keep_last: int | None = None, in_use: Iterable[str] = (),
       dry_run: bool = False) -> GcPlan:
    """Apply `plan_gc`: each deletion renames the snapshot away first (readers see it whole or not at
    all), then removes it; staging directories of crashed writers older than an hour go too."""
    plan = plan_gc(store, keep_last=keep_last, in_use=in_use)
    if dry_run:
        return plan
    for identity in plan.delete:
        delete_snapshot(store, identity)
    _remove_stale_staging(store)
    log.info("store_gc", deleted=len(plan.delete), kept=len(plan.keep), freed_bytes=plan.freed_bytes)
    return plan


def delete_snapshot(store: SnapshotStore, identity: str) -> None:
    check_name(identity, field="identity")
    path = resolve_under(store.snapshots_dir, identity, field="identity")
    if not path.is_dir():
        raise NotFoundError(f"no snapshot named {identity!r}", field="identity")
    trash = store.snapshots_dir / f"{_TMP_PREFIX}del-{identity}-{os.urandom(4).hex()}"
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        resolve_under(_pins_dir(store), identity, field="identity").unlink()


def _remove_stale_staging(store: SnapshotStore) -> None:
    now = time.time()
    for entry in store.snapshots_dir.iterdir():
        if entry.name.startswith(_TMP_PREFIX):
            with contextlib.suppress(OSError):
                if now - entry.stat().st_mtime > STALE_STAGING_S:
                    shutil.rmtree(entry, ignore_errors=True)


def disk_usage_bytes(root: str | os.PathLike[str]) -> int:
    """Bytes the files under `root` take on disk (allocated blocks; 0 when `root` is missing).

    For `firetitan status`: `disk_usage_bytes(resolve_home().store)`.
    """
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for fname in files:
            with contextlib.suppress(OSError):
                st = os.lstat(os.path.join(dirpath, fname))
                total += st.st_blocks * 512 if hasattr(st, "st_blocks") else st.st_size
    return total


def store_summary(store: SnapshotStore) -> dict[str, int]:
    """One line's worth for `firetitan status`: snapshot count, pinned count and bytes on disk."""
    return {"snapshots": len(store.list()), "pinned": len(pinned(store)), "bytes": disk_usage_bytes(store.root)}
