"""Durable resource records in SQLite (WAL): one row per (kind, account, id), the record as JSON."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

_SCHEMA = """
CREATE TABLE IF NOT EXISTS resources (
    kind TEXT NOT NULL,
    account TEXT NOT NULL,
    id TEXT NOT NULL,
    data TEXT NOT NULL,
    created REAL NOT NULL DEFAULT (julianday('now')),
    PRIMARY KEY (kind, account, id)
)
"""


class StateStore:
    """Short synchronous statements only: each is a single-row read or write that finishes in
    microseconds, so calling them from the event loop does not stall it."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=10.0)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(_SCHEMA)

    def get(self, kind: str, account: str, rid: str) -> dict[str, Any] | None:
        row = self._db.execute("SELECT data FROM resources WHERE kind=? AND account=? AND id=?",
                               (kind, account, rid)).fetchone()
        return json.loads(row[0]) if row else None

    def put(self, kind: str, account: str, rid: str, data: dict[str, Any]) -> None:
        self._db.execute(
            "INSERT INTO resources(kind, account, id, data) VALUES(?,?,?,?) "
            "ON CONFLICT(kind, account, id) DO UPDATE SET data=excluded.data",
            (kind, account, rid, json.dumps(data)))

    def delete(self, kind: str, account: str, rid: str) -> None:
        self._db.execute("DELETE FROM resources WHERE kind=? AND account=? AND id=?", (kind, account, rid))

    def list(self, kind: str, account: str | None = None) -> list[dict[str, Any]]:
        if account is None:
            rows = self._db.execute("SELECT data FROM resources WHERE kind=? ORDER BY created, id", (kind,))
        else:
            rows = self._db.execute("SELECT data FROM resources WHERE kind=? AND account=? ORDER BY created, id",
                                    (kind, account))
        return [json.loads(r[0]) for r in rows.fetchall()]

    def close(self) -> None:
        self._db.close()
