"""Train-state checkpoints of a run: `checkpoints.jsonl` records plus a data cursor file beside each."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from firetitan.runtime.cursor import CURSOR_FILE, DataCursor
from firetitan.runtime.remote import call


class RunCheckpoints:
    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.index = self.run_dir / "checkpoints.jsonl"

    def record(self, step: int, state_path: str, cursor_state: dict[str, Any], **extra: Any) -> dict[str, Any]:
        """Write the cursor for `step`, then append the record (the record is the commit point)."""
        cursor_file = self.run_dir / "checkpoints" / f"step_{step:06d}" / CURSOR_FILE
        DataCursor.from_state(cursor_state).save(cursor_file, extra={"step": step})
        rec = {"step": step, "state_path": state_path, "cursor_file": str(cursor_file), "time": time.time(), **extra}
        with self.index.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(rec) + "\n")
        return rec

    def latest(self) -> dict[str, Any] | None:
        if not self.index.exists():
            return None
        last = None
        for line in self.index.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn last line from a crash: the previous record stands
            if Path(rec.get("cursor_file", "")).exists():
                last = rec
        return last

    def load_cursor(self, rec: dict[str, Any]) -> DataCursor:
        cursor, _ = DataCursor.load(Path(rec["cursor_file"]))
        return cursor

    async def resume(self, training: Any, cursor: DataCursor, *, enabled: bool,
                     timeout_s: float) -> tuple[DataCursor, int, dict[str, Any] | None]:
        """Load the latest train state (weights + optimizer) into `training`.

        Returns the cursor and step to go on from and the record used (`cursor`, 0 and None when
        there is nothing to resume or `enabled` is false).
        """
        rec = self.latest() if enabled else None
        if rec is None:
            return cursor, 0, None
        await call(training.load_state_with_optimizer(rec["state_path"]), timeout=timeout_s,
                   what=f"load_state_with_optimizer({rec['state_path']})")
        return self.load_cursor(rec), int(rec["step"]), rec
