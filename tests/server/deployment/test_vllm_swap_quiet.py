"""Before an ASYNC swap flips the version, the vLLM backend waits until every chunk sampled on the old
weights has been relayed; if chunks keep coming, the swap is refused rather than tag old tokens new."""

from __future__ import annotations

import asyncio
import time

import pytest

from firetitan.errors import APIStatusError
from firetitan.server.deployment.vllm_backend.hotload import wait_quiet


async def test_waits_out_a_relay_backlog_longer_than_the_quiet_window() -> None:
    """A backlog still draining for 0.4 s (20 chunks 20 ms apart, each gap inside the 50 ms window) holds the
    swap until it ends."""
    last = time.monotonic()

    async def backlog() -> None:
        nonlocal last
        for _ in range(20):
            await asyncio.sleep(0.02)  # closer together than the 50 ms quiet window
            last = time.monotonic()

    started = time.monotonic()
    drain = asyncio.create_task(backlog())
    await wait_quiet(lambda: last, limit=10)
    assert drain.done(), "the swap went ahead while old chunks were still arriving"
    assert time.monotonic() - last >= 0.05
    assert time.monotonic() - started >= 0.4


async def test_chunks_that_never_stop_refuse_the_swap() -> None:
    last = time.monotonic()

    async def endless() -> None:
        nonlocal last
        while True:
            await asyncio.sleep(0.01)
            last = time.monotonic()

    feeder = asyncio.create_task(endless())
    try:
        with pytest.raises(APIStatusError, match="did not go quiet"):
            await wait_quiet(lambda: last, limit=0.3)
    finally:
        feeder.cancel()
