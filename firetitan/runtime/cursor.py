"""A resumable data cursor: hands out dataset positions in order and remembers what was trained on.

Positions are global (`epoch * size + i`). The cursor's saved state is "frontier-aligned": every
position handed out but not yet trained (in flight, buffered, or dropped as stale) is re-issued first
after a resume, so no prompt is skipped or trained twice.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

CURSOR_FILE = "data_cursor.json"


class DataCursor:
    def __init__(self, size: int, *, epochs: int | None = 1, seed: int | None = None,
                 next_position: int = 0, redo: list[int] | None = None) -> None:
        if size < 1:
            raise ValueError(f"size: the dataset must hold at least one item, got {size}")
        if epochs is not None and epochs < 1:
            raise ValueError(f"epochs: must be >= 1 or None (forever), got {epochs}")
        self.size = size
        self.epochs = epochs
        self.seed = seed
        self._next = next_position
        self._redo: list[int] = sorted(redo or [])
        self._issued: set[int] = set()
        self._perms: dict[int, list[int]] = {}

    @property
    def limit(self) -> int | None:
        return None if self.epochs is None else self.size * self.epochs

    def index(self, position: int) -> int:
        """Dataset index of a global position (a seeded shuffle per epoch when `seed` is set)."""
        epoch, offset = divmod(position, self.size)
        if self.seed is None:
            return offset
        perm = self._perms.get(epoch)
        if perm is None:
            perm = list(range(self.size))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(perm)
            self._perms = {epoch: perm}  # only the current epoch is ever needed
        return perm[offset]

    def next(self) -> int | None:
        """The next position to work on, or None when every epoch has been handed out."""
        if self._redo:
            position = self._redo.pop(0)
        elif self.limit is not None and self._next >= self.limit:
            return None
        else:
            position = self._next
            self._next += 1
        self._issued.add(position)
        return position

    def give_back(self, position: int) -> None:
        """A handed-out position that will not be trained on (stale, failed): issue it again first."""
        self._issued.discard(position)
        self._redo.append(position)
        self._redo.sort()

    def mark_trained(self, positions: list[int]) -> None:
        for p in positions:
            if p not in self._issued:
                raise ValueError(f"positions: {p} was not handed out (or was already trained)")
            self._issued.remove(p)

    def can_issue(self) -> bool:
        """Whether `next()` would hand out a position now (one to redo, or an epoch not yet handed out)."""
        return bool(self._redo) or self.limit is None or self._next < self.limit

    @property
    def outstanding(self) -> int:
        """Positions handed out and neither trained nor given back (in flight, queued, or buffered)."""
        return len(self._issued)

    @property
    def exhausted(self) -> bool:
        return not self._redo and not self._issued and self.limit is not None and self._next >= self.limit

    def state(self) -> dict[str, Any]:
        """What a resume needs: everything handed out but not trained goes back to the front."""
        return {"size": self.size, "epochs": self.epochs, "seed": self.seed, "next": self._next,
                "redo": sorted([*self._redo, *self._issued])}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> DataCursor:
        return cls(int(state["size"]), epochs=state["epochs"], seed=state["seed"],
                   next_position=int(state["next"]), redo=[int(p) for p in state["redo"]])

    def save(self, path: Path, extra: dict[str, Any] | None = None) -> Path:
        """Write the state atomically (a crash mid-write never leaves a torn cursor)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps({**self.state(), **(extra or {})}, sort_keys=True))
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: Path) -> tuple[DataCursor, dict[str, Any]]:
        raw = json.loads(Path(path).read_text())
        extra = {k: v for k, v in raw.items() if k not in {"size", "epochs", "seed", "next", "redo"}}
        return cls.from_state(raw), extra
