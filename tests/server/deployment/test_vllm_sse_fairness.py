"""The vLLM backend's SSE reader yields to the event loop per chunk, even when its lines are already buffered."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace
from unittest import mock

import aiohttp

from firetitan.server.deployment.vllm_backend.sampling import _sse


def test_a_buffered_backlog_does_not_hold_the_event_loop() -> None:
    """A stream whose 200 chunks all sit in aiohttp's buffer is read while another task keeps running:
    before, the reader drained the backlog without suspending, and /health and a hot-load's pause waited
    behind 8 such streams for 1-8 s."""

    async def run() -> tuple[int, int]:
        content = aiohttp.StreamReader(mock.Mock(_reading_paused=False), 2**16, loop=asyncio.get_running_loop())
        for i in range(200):
            content.feed_data(f"data: {json.dumps({'i': i})}\n\n".encode())
        content.feed_data(b"data: [DONE]\n\n")
        content.feed_eof()
        ticks = 0
        stop = asyncio.Event()

        async def other_task() -> None:
            nonlocal ticks
            while not stop.is_set():
                ticks += 1
                await asyncio.sleep(0)

        ticker = asyncio.create_task(other_task())
        await asyncio.sleep(0)  # the ticker is running
        start = ticks
        chunks = [chunk async for chunk in _sse(SimpleNamespace(content=content))]  # type: ignore[arg-type]
        during = ticks - start
        stop.set()
        await ticker
        return len(chunks), during

    chunks, during = asyncio.run(run())
    assert chunks == 200
    assert during >= 200  # the other task ran at least once per chunk
