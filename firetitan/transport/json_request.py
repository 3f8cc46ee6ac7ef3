"""JSON over HTTP with retries (`request_json`): every failure comes back as a typed `FiretitanError`."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import aiohttp

from firetitan.errors import APIConnectionError, APITimeoutError, FiretitanError, from_response
from firetitan.transport.retry import RetryPolicy, parse_retry_after

NO_RETRY = RetryPolicy(max_attempts=1)


class _Retryable(Exception):
    def __init__(self, error: FiretitanError, retry_after: float | None = None) -> None:
        super().__init__(error.message)
        self.error = error
        self.retry_after = retry_after


async def _attempt(session: aiohttp.ClientSession, method: str, url: str, json: Any, *, timeout: float,
                   policy: RetryPolicy, params: Mapping[str, str] | None, headers: Mapping[str, str] | None) -> Any:
    """One attempt: the decoded JSON body (None when empty, the text when not JSON), or the typed
    error the service sent (`errors.from_response`), wrapped in `_Retryable` when worth another try."""
    try:
        async with session.request(method, url, json=json, params=params, headers=headers,
                                   timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            body = await _read_body(resp)
            if resp.status < 400:
                return body
            err = from_response(resp.status, body)
            if policy.retryable(resp.status):
                raise _Retryable(err, parse_retry_after(resp.headers.get("Retry-After")))
            raise err
    except TimeoutError as exc:
        raise _Retryable(APITimeoutError(f"{method} {url} timed out after {timeout:.1f}s")) from exc
    except aiohttp.ClientError as exc:
        raise _Retryable(APIConnectionError(f"{method} {url} failed: {type(exc).__name__}: {exc}")) from exc


async def request_json(session: aiohttp.ClientSession, method: str, url: str, json: Any = None, *,
                       timeout: float, policy: RetryPolicy = NO_RETRY, params: Mapping[str, str] | None = None,
                       headers: Mapping[str, str] | None = None) -> Any:
    """Send `method url` with up to `policy.max_attempts` attempts of at most `timeout` seconds each
    and return the decoded body (None when empty, the text when not JSON).

    Transport failures become `APIConnectionError` / `APITimeoutError`, error statuses the typed
    error the service sent (`errors.from_response`). Connection errors, timeouts and the policy's statuses are retried after `policy.delay` (which
    honours `Retry-After` as a floor); the last failure is raised as its typed error.
    """
    last: _Retryable | None = None
    for attempt in range(policy.max_attempts):
        if last is not None:
            await asyncio.sleep(policy.delay(attempt, last.retry_after))
        try:
            return await _attempt(session, method, url, json, timeout=timeout, policy=policy, params=params,
                                   headers=headers)
        except _Retryable as exc:
            last = exc
    assert last is not None
    raise last.error from last.__cause__


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
