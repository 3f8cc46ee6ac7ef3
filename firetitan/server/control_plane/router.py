"""Pick a deployment replica for each request: fewest outstanding requests, ties taken in turn."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from contextlib import contextmanager


class ReplicaRouter:
    """Counts requests in flight per (deployment, replica) and hands out the least-loaded replica."""

    def __init__(self) -> None:
        self._outstanding: dict[tuple[str, int], int] = {}
        self._turn = itertools.count()

    def outstanding(self, deployment: str, index: int) -> int:
        return self._outstanding.get((deployment, index), 0)

    def choose(self, deployment: str, ready: Sequence[int]) -> int | None:
        """The ready replica index with the fewest outstanding requests (None if none is ready)."""
        if not ready:
            return None
        low = min(self.outstanding(deployment, i) for i in ready)
        tied = [i for i in ready if self.outstanding(deployment, i) == low]
        return tied[next(self._turn) % len(tied)]

    @contextmanager
    def track(self, deployment: str, index: int) -> Iterator[None]:
        key = (deployment, index)
        self._outstanding[key] = self._outstanding.get(key, 0) + 1
        try:
            yield
        finally:
            self._outstanding[key] -= 1
            if self._outstanding[key] <= 0:
                del self._outstanding[key]

    def forget(self, deployment: str) -> None:
        for key in [k for k in self._outstanding if k[0] == deployment]:
            del self._outstanding[key]
