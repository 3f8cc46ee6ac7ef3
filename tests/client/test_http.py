"""HttpClient retries transient failures of a remote service and gives up with a typed error."""

from __future__ import annotations

import pytest
from aioresponses import aioresponses

from firetitan.client.http import HttpClient
from firetitan.errors import APIConnectionError, APIStatusError, ConflictError


async def test_retries_503_then_succeeds() -> None:
    http = HttpClient("http://remote.invalid", retries=3, backoff=0.001)
    with aioresponses() as mocked:
        mocked.get("http://remote.invalid/x", status=503, payload={"error": "busy"})
        mocked.get("http://remote.invalid/x", status=200, payload={"ok": 1})
        assert await http.request_json("GET", "/x") == {"ok": 1}
    await http.close()


async def test_gives_up_with_typed_error() -> None:
    http = HttpClient("http://remote.invalid", retries=1, backoff=0.001)
    with aioresponses() as mocked:
        mocked.get("http://remote.invalid/x", status=503, payload={"error": "busy"})
        mocked.get("http://remote.invalid/x", status=503, payload={"error": "busy"})
        with pytest.raises(APIStatusError) as info:
            await http.request_json("GET", "/x")
        assert info.value.status_code == 503
    await http.close()


async def test_4xx_is_not_retried() -> None:
    http = HttpClient("http://remote.invalid", retries=3, backoff=0.001)
    with aioresponses() as mocked:
        mocked.post("http://remote.invalid/x", status=409,
                    payload={"error": {"type": "ConflictError", "message": "m", "field": "f"}})
        with pytest.raises(ConflictError):
            await http.request_json("POST", "/x", {})
    await http.close()


async def test_connection_refused_is_typed() -> None:
    http = HttpClient("http://127.0.0.1:9", retries=1, backoff=0.001, timeout=2)
    with pytest.raises(APIConnectionError):
        await http.request_json("GET", "/x")
    await http.close()


async def test_429_retry_after_is_a_floor(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 429 is retried, and the wait before the retry is at least the server's Retry-After."""
    import asyncio

    slept: list[float] = []
    real_sleep = asyncio.sleep

    async def record(delay: float, *a: object) -> None:
        slept.append(delay)
        await real_sleep(0)

    monkeypatch.setattr(asyncio, "sleep", record)
    http = HttpClient("http://remote.invalid", retries=2, backoff=0.001)
    with aioresponses() as mocked:
        mocked.get("http://remote.invalid/x", status=429, payload={"error": "full"}, headers={"Retry-After": "7"})
        mocked.get("http://remote.invalid/x", status=200, payload={"ok": 1})
        assert await http.request_json("GET", "/x") == {"ok": 1}
    assert slept and slept[0] >= 7.0
    await http.close()


async def test_retry_false_makes_one_attempt() -> None:
    http = HttpClient("http://remote.invalid", retries=3, backoff=0.001)
    with aioresponses() as mocked:
        mocked.get("http://remote.invalid/x", status=503, payload={"error": "busy"})
        mocked.get("http://remote.invalid/x", status=200, payload={"ok": 1})
        with pytest.raises(APIStatusError):
            await http.request_json("GET", "/x", retry=False)
    await http.close()
