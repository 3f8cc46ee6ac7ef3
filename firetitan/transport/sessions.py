"""`LoopSessions`: one aiohttp session per event loop, closed when its loop shuts down."""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import AsyncIterator, Mapping

import aiohttp


class LoopSessions:
    """aiohttp sessions are bound to the loop that created them, and SDK objects are used from the
    background loop, from `asyncio.run` in user code and from notebooks alike; so a session is kept
    per loop. Each loop also gets an async generator whose `finally` closes that loop's session when
    `asyncio.run` shuts the loop's async generators down, so per-step loops never leak connections.
    """

    def __init__(self, headers: Mapping[str, str] | None = None) -> None:
        self.headers = dict(headers or {})
        self._sessions: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, aiohttp.ClientSession] = (
            weakref.WeakKeyDictionary())
        self._keepers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, AsyncIterator[None]] = (
            weakref.WeakKeyDictionary())

    async def get(self) -> aiohttp.ClientSession:
        """The session of the running loop, created on first use."""
        loop = asyncio.get_running_loop()
        sess = self._sessions.get(loop)
        if sess is None or sess.closed:
            # limit=0: the concurrency controllers bound in-flight requests, not the connector.
            sess = aiohttp.ClientSession(headers=self.headers, connector=aiohttp.TCPConnector(limit=0))
            self._sessions[loop] = sess
            keeper = _close_on_loop_shutdown(sess)
            await keeper.__anext__()
            self._keepers[loop] = keeper
        return sess

    async def close(self) -> None:
        """Close the running loop's session; sessions of other loops close when their loops shut down."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        sess = self._sessions.pop(loop, None)
        keeper = self._keepers.pop(loop, None)
        if keeper is not None:
            await keeper.aclose()  # type: ignore[attr-defined]
        elif sess is not None and not sess.closed:
            await sess.close()


def bearer(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


async def _close_on_loop_shutdown(session: aiohttp.ClientSession) -> AsyncIterator[None]:
    try:
        yield
    finally:
        if not session.closed:
            await session.close()
