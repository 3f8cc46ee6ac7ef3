"""The gateway's own futures: one asyncio task per Tinker request id, answered in the SDK's shapes."""

from __future__ import annotations

import asyncio
import itertools
import secrets
from collections import OrderedDict
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

from firetitan.errors import NotFoundError


class Failure(Exception):
    """A request failed on the server: answered as HTTP 200 `{"error", "category"}` (the SDK raises
    `RequestFailedError`). `category` is "user" for a bad request and "server" otherwise."""

    def __init__(self, message: str, category: str = "user") -> None:
        super().__init__(message)
        self.message, self.category = message, category


@dataclass
class Outcome:
    """A finished request: a JSON body, or protobuf bytes the SDK asked for with `Accept`."""

    json: dict[str, Any] | None = None
    proto: bytes | None = None


class FutureTable:
    """Request id -> task. At most `retention` finished results are kept (oldest dropped first)."""

    def __init__(self, retention: int = 4096) -> None:
        self.retention = retention
        self._tasks: OrderedDict[str, asyncio.Task[Outcome]] = OrderedDict()
        self._prefix = secrets.token_hex(3)
        self._ids = itertools.count(1)

    def spawn(self, coro: Coroutine[Any, Any, Outcome]) -> str:
        rid = f"tk-{self._prefix}-{next(self._ids)}"
        task = asyncio.get_running_loop().create_task(coro, name=f"tinker-{rid}")
        # Retrieve reads the exception; this keeps an unread one from being logged as "never retrieved".
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        self._tasks[rid] = task
        self._evict()
        return rid

    def failed(self, message: str, category: str = "user") -> str:
        async def fail() -> Outcome:
            raise Failure(message, category)

        return self.spawn(fail())

    def get(self, rid: str) -> asyncio.Task[Outcome]:
        task = self._tasks.get(rid)
        if task is None:
            raise NotFoundError(f"request_id {rid!r} is unknown or its result has expired", field="request_id")
        return task

    def _evict(self) -> None:
        excess = len(self._tasks) - self.retention
        for rid in [r for r, t in self._tasks.items() if t.done()][:max(0, excess)]:
            del self._tasks[rid]

    def cancel_all(self) -> None:
        for task in self._tasks.values():
            task.cancel()
