"""Pick a deployment replica for each request: fewest outstanding requests, ties taken in turn."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from contextlib import contextmanager


class ReplicaRouter:
    """Counts requests in flight per (deployment, replica) and hands out the least-loaded replica."""

    def __init__(self) -> None:
        self._outstanding: dict[tuple[str, int], _Count] = {}
        self._turn = itertools.count()

    def outstanding(self, deployment: str, index: int) -> int:
        count = self._outstanding.get((deployment, index))
        return count.n if count else 0

    def choose(self, deployment: str, ready: Sequence[int]) -> int | None:
        """The ready replica index with the fewest outstanding requests (None if none is ready)."""
        if not ready:
            return None
        low = min(self.outstanding(deployment, i) for i in ready)
        tied = [i for i in ready if self.outstanding(deployment, i) == low]
        return tied[next(self._turn) % len(tied)]

    @contextmanager
    def track(self, deployment: str, index: int) -> Iterator[None]:
        # The request keeps its own counter object: if `forget` drops the deployment (deleted while the
        # request is in flight), the finally decrements that orphan instead of failing or touching a new
        # deployment of the same name.
        key = (deployment, index)
        count = self._outstanding.setdefault(key, _Count())
        count.n += 1
        try:
            yield
        finally:
            count.n -= 1
            if count.n <= 0 and self._outstanding.get(key) is count:
                del self._outstanding[key]

    def forget(self, deployment: str) -> None:
        for key in [k for k in self._outstanding if k[0] == deployment]:
            del self._outstanding[key]


class _Count:
    __slots__ = ("n",)

    def __init__(self) -> None:
        self.n = 0
