"""A small JSON-over-HTTP client with timeouts, retries and typed errors, one session per event loop."""

from __future__ import annotations

import asyncio
import random
import weakref
from typing import Any

import aiohttp

from firetitan.errors import APIConnectionError, APITimeoutError, FiretitanError, from_response

_RETRY_STATUS = frozenset({502, 503, 504})


class HttpClient:
    """Talks to one firetitan service.

    aiohttp sessions are bound to the event loop that created them, and SDK objects are used from
    the background loop, from `asyncio.run` in user code and from notebooks alike, so a session is
    kept per loop and closed with it.
    """

    def __init__(self, base_url: str, api_key: str | None = None, *, timeout: float = 60.0,
                 retries: int = 3, backoff: float = 0.25) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self._sessions: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, aiohttp.ClientSession] = (
            weakref.WeakKeyDictionary()
        )

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def session(self) -> aiohttp.ClientSession:
        """The session for the running loop (created on first use)."""
        loop = asyncio.get_running_loop()
        sess = self._sessions.get(loop)
        if sess is None or sess.closed:
            sess = aiohttp.ClientSession(headers=self.headers,
                                         connector=aiohttp.TCPConnector(limit=0, force_close=False))
            self._sessions[loop] = sess
        return sess

    def url(self, path: str) -> str:
        return path if path.startswith("http") else f"{self.base_url}/{path.lstrip('/')}"

    async def request_json(self, method: str, path: str, json: Any = None, *, timeout: float | None = None,
                           retry: bool = True, params: dict[str, str] | None = None) -> Any:
        """Send one request and return the decoded JSON body (None for an empty body).

        Connection errors and 502/503/504 are retried with jittered exponential backoff when
        `retry` is set; every attempt is bounded by `timeout` seconds.
        """
        attempts = self.retries + 1 if retry else 1
        limit = self.timeout if timeout is None else timeout
        last: FiretitanError | None = None
        for attempt in range(attempts):
            if attempt:
                await asyncio.sleep(self.backoff * (2 ** (attempt - 1)) * (0.5 + random.random()))
            try:
                async with self.session().request(
                    method, self.url(path), json=json, params=params,
                    timeout=aiohttp.ClientTimeout(total=limit),
                ) as resp:
                    body = await _read_body(resp)
                    if resp.status < 400:
                        return body
                    err = from_response(resp.status, body)
                    if resp.status in _RETRY_STATUS:
                        last = err
                        continue
                    raise err
            except TimeoutError as exc:
                last = APITimeoutError(f"{method} {path} timed out after {limit:.1f}s")
                last.__cause__ = exc
            except aiohttp.ClientError as exc:
                last = APIConnectionError(f"{method} {self.url(path)} failed: {type(exc).__name__}: {exc}")
                last.__cause__ = exc
        assert last is not None
        raise last

    async def close(self) -> None:
        """Close the session of the running loop; sessions of other loops close with their loops."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        sess = self._sessions.pop(loop, None)
        if sess is not None and not sess.closed:
            await sess.close()


async def _read_body(resp: aiohttp.ClientResponse) -> Any:
    text = await resp.text()
    if not text:
        return None
    if "json" in (resp.content_type or ""):
        try:
            return await resp.json(content_type=None)
        except ValueError:
            return text
    return text
