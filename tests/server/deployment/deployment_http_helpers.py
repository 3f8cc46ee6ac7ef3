"""HTTP helpers shared by the deployment-worker tests (plain functions, no fixtures)."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import aiohttp

TIMEOUT = aiohttp.ClientTimeout(total=120)


async def post(url: str, body: dict[str, Any]) -> tuple[int, dict[str, Any], dict[str, str]]:
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session, session.post(url, json=body) as resp:
        return resp.status, await resp.json(), dict(resp.headers)


async def stream(url: str, body: dict[str, Any], started: asyncio.Event | None = None
                 ) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """POST with stream=true and collect the SSE chunks; sets `started` when the first one arrives."""
    chunks: list[dict[str, Any]] = []
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session, \
            session.post(url, json={**body, "stream": True}) as resp:
        assert resp.status == 200, await resp.text()
        buf = b""
        async for data in resp.content.iter_any():
            buf += data
            while b"\n\n" in buf:
                event, buf = buf.split(b"\n\n", 1)
                payload = event.decode().removeprefix("data: ")
                if payload == "[DONE]":
                    return chunks, dict(resp.headers)
                chunks.append(json.loads(payload))
                if started is not None:
                    started.set()
    raise AssertionError("stream ended without [DONE]")


async def metrics(url: str) -> dict[str, float]:
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session, session.get(f"{url}/metrics") as resp:
        text = await resp.text()
    out = {}
    for line in text.splitlines():
        m = re.match(r'^(\w+)\{([^}]*)\} (\S+)$', line)
        if m:
            reason = re.search(r'reason="(\w+)"', m[2])
            out[m[1] + (f":{reason[1]}" if reason else "")] = float(m[3])
    return out
