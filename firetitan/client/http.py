"""`HttpClient`: the SDK's handle on one firetitan service (base URL, key, retry policy) over the transport."""

from __future__ import annotations

from typing import Any

import aiohttp

from firetitan.transport import LoopSessions, RetryPolicy, bearer, request_json


class HttpClient:
    """Talks to one firetitan service; sessions are per event loop (see `LoopSessions`).

    `retries`/`backoff` are shorthand for `policy=RetryPolicy(max_attempts=retries + 1,
    backoff_base=backoff)`; an explicit `policy` wins.
    """

    def __init__(self, base_url: str, api_key: str | None = None, *, timeout: float = 60.0,
                 retries: int = 3, backoff: float = 0.25, policy: RetryPolicy | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout
        self.policy = policy or RetryPolicy(max_attempts=retries + 1, backoff_base=backoff)
        self._sessions = LoopSessions(bearer(api_key))

    @property
    def headers(self) -> dict[str, str]:
        return bearer(self.api_key)

    async def session(self) -> aiohttp.ClientSession:
        """The session for the running loop (created on first use)."""
        return await self._sessions.get()

    def url(self, path: str) -> str:
        return path if path.startswith("http") else f"{self.base_url}/{path.lstrip('/')}"

    async def request_json(self, method: str, path: str, json: Any = None, *, timeout: float | None = None,
                           retry: bool = True, params: dict[str, str] | None = None) -> Any:
        """Send one request and return the decoded JSON body (None for an empty body).

        Transient failures (connection errors, timeouts, the policy's statuses incl. 429 with its
        `Retry-After`) are retried per `self.policy` when `retry` is set; every attempt is bounded
        by `timeout` seconds.
        """
        return await request_json(await self.session(), method, self.url(path), json,
                                  timeout=self.timeout if timeout is None else timeout,
                                  policy=self.policy if retry else self.policy.once(), params=params)

    async def close(self) -> None:
        """Close the session of the running loop; sessions of other loops close with their loops."""
        await self._sessions.close()
