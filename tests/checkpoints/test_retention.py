"""Store retention: last K per run, pins, served snapshots and delta bases survive gc; the CLI drives it."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time

import pytest
import torch

from firetitan.checkpoints import SnapshotStore
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
from firetitan.errors import ConfigError, InvalidRequestError, NotFoundError

CONFIG = {"model_type": "toy", "hidden_size": 4}


def _weights(step: int) -> dict[str, torch.Tensor]:
    return {"w": torch.full((64,), float(step)), "b": torch.arange(8, dtype=torch.float32) * step}


def _fill(store: SnapshotStore, suffix: str, steps: int) -> list[str]:
    """A base then `steps - 1` deltas against it, the way an RL run saves one per step."""
    base = store.save_base("step-0", _weights(0), CONFIG, client_suffix=suffix).identity
    out = [base]
    for step in range(1, steps):
        out.append(store.save_delta(f"step-{step}", _weights(step), base, client_suffix=suffix).identity)
    return out


def test_last_k_per_run_and_the_base_they_need(tmp_path) -> None:
    store = SnapshotStore(tmp_path / "store")
    run_a = _fill(store, "aaaa1111", 6)
    run_b = _fill(store, "bbbb2222", 2)
    assert {run_of(store.manifest(i)) for i in run_a} == {"aaaa1111"}
    before = disk_usage_bytes(store.root)
    plan = gc(store, keep_last=2)
    # run a: the two newest deltas, and their base although it is older than the last two
    assert sorted(plan.keep) == sorted([*run_a[-2:], run_a[0], *run_b])
    assert plan.keep[run_a[0]] == "base of a kept delta"
    assert sorted(plan.delete) == sorted(run_a[1:4])
    assert {m.identity for m in store.list()} == set(plan.keep)
    assert plan.freed_bytes > 0 and disk_usage_bytes(store.root) < before
    # the kept deltas still apply to their kept base
    assert torch.equal(store.load_state_dict(run_a[-1])["w"], _weights(5)["w"])
    assert gc(store, keep_last=2).delete == []  # idempotent


def test_pins_and_served_snapshots_survive(tmp_path) -> None:
    store = SnapshotStore(tmp_path / "store")
    ids = _fill(store, "cccc3333", 5)
    pin(store, ids[1])
    assert pinned(store) == {ids[1]}
    plan = gc(store, keep_last=1, in_use=[ids[2]], dry_run=True)
    assert plan.keep[ids[1]] == "pinned" and plan.keep[ids[2]] == "served by a deployment"
    assert plan.delete == [ids[3]]
    assert len(store.list()) == 5  # dry run deletes nothing
    assert unpin(store, ids[1]) is True and unpin(store, ids[1]) is False
    assert ids[1] in plan_gc(store, keep_last=1).delete
    with pytest.raises(NotFoundError):
        pin(store, "no-such-snapshot")
    with pytest.raises(InvalidRequestError):
        pin(store, "../escape")
    with pytest.raises(ConfigError):
        plan_gc(store, keep_last=0)


def test_served_identities_come_from_the_control_plane_records(tmp_path) -> None:
    db_path = tmp_path / "state.sqlite"
    db = sqlite3.connect(db_path)
    db.execute("CREATE TABLE resources (kind TEXT, account TEXT, id TEXT, data TEXT, created REAL)")
    chain = [{"identity": "step-0-aa"}, {"identity": "step-3-aa", "previousSnapshotIdentity": "step-0-aa"}]
    db.execute("INSERT INTO resources VALUES ('deployment', 'local', 'd1', ?, 0)",
               (json.dumps({"snapshotChain": chain}),))
    db.execute("INSERT INTO resources VALUES ('trainer', 'local', 't1', ?, 0)",
               (json.dumps({"snapshotChain": [{"identity": "not-a-deployment"}]}),))
    db.commit()
    db.close()
    assert in_use_from_state_db(db_path) == {"step-0-aa", "step-3-aa"}
    assert in_use_from_state_db(tmp_path / "missing.sqlite") == set()


def test_stale_staging_directories_are_removed(tmp_path) -> None:
    store = SnapshotStore(tmp_path / "store")
    stale = store.snapshots_dir / ".tmp-step-9-crashed"
    fresh = store.snapshots_dir / ".tmp-step-10-writing"
    for d in (stale, fresh):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"x" * 100)
    old = time.time() - 2 * 3600
    os.utime(stale, (old, old))
    gc(store)
    assert not stale.exists() and fresh.exists()


def test_store_cli(tmp_path) -> None:
    home = tmp_path / "home"
    store = SnapshotStore(home / "store")
    ids = _fill(store, "dddd4444", 4)
    env = {**os.environ, "FIRETITAN_HOME": str(home)}

    def cli(*args: str) -> str:
        proc = subprocess.run([sys.executable, "-m", "firetitan", "store", *args], capture_output=True,
                              text=True, env=env, timeout=120)
        assert proc.returncode == 0, proc.stderr + proc.stdout
        return proc.stdout

    rows = [json.loads(line) for line in cli("ls", "--json").splitlines()]
    assert [r["identity"] for r in rows] == ids and all(r["gc"] != "deletable" for r in rows)
    assert cli("pin", ids[1]).strip() == f"pinned {ids[1]}"
    out = cli("gc", "--keep-last", "1", "--dry-run")
    assert f"would delete {ids[2]}" in out and ids[1] not in out.replace(f"would delete {ids[2]}", "")
    assert len(store.list()) == 4
    cli("gc", "--keep-last", "1")
    assert {m.identity for m in store.list()} == {ids[0], ids[1], ids[3]}
    assert int(cli("du")) == disk_usage_bytes(home / "store") > 0


def test_store_summary_counts_what_is_there(tmp_path) -> None:
    from firetitan.checkpoints.retention import store_summary

    store = SnapshotStore(tmp_path / "store")
    assert store_summary(store) == {"snapshots": 0, "pinned": 0, "bytes": 0}
    ids = _fill(store, "eeee5555", 2)
    pin(store, ids[0])
    summary = store_summary(store)
    assert summary["snapshots"] == 2 and summary["pinned"] == 1
    assert summary["bytes"] >= sum(store.manifest(i).size_bytes for i in ids)
