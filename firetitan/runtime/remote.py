"""Awaiting remote work (APIFutures, coroutines) under a deadline that raises a typed timeout."""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
from collections.abc import Awaitable, Sequence
from typing import Any, TypeVar

import anyio

from firetitan.errors import APITimeoutError

T = TypeVar("T")

DEFAULT_TIMEOUT_S = 600.0


async def resolve(value: Any) -> Any:
    """Await `value` until it is a plain result.

    Client methods come in two shapes (`foo()` -> APIFuture, `await foo_async()` -> result or a
    future of it, Tinker style); unwrapping every awaitable layer lets the runtime accept either.
    """
    while True:
        if isinstance(value, concurrent.futures.Future):
            value = asyncio.wrap_future(value)
        if inspect.isawaitable(value):
            value = await value
            continue
        return value


async def call(value: Awaitable[T] | Any, *, timeout: float | None, what: str) -> Any:
    """Resolve `value` within `timeout` seconds, else raise `APITimeoutError` naming `what`.

    `timeout=None` is refused on purpose: a remote call without a deadline is how async RL runs hang
    silently; pass a large number if you really mean to wait long.
    """
    if timeout is None or timeout <= 0:
        raise ValueError(f"timeout: a positive number of seconds is required for {what!r}, got {timeout!r}")
    try:
        with anyio.fail_after(timeout):
            return await resolve(value)
    except TimeoutError as exc:
        if isinstance(exc, APITimeoutError):
            raise
        cancel = getattr(value, "cancel", None)
        if callable(cancel):
            cancel()
        raise APITimeoutError(f"{what} did not finish within {timeout:g} s") from exc


async def gather(awaitables: Sequence[Awaitable[T]]) -> list[T]:
    """Run awaitables concurrently in one task group; results in input order, first error cancels the rest."""
    results: list[Any] = [None] * len(awaitables)

    async def one(i: int, aw: Awaitable[T]) -> None:
        results[i] = await aw

    async with anyio.create_task_group() as tg:
        for i, aw in enumerate(awaitables):
            tg.start_soon(one, i, aw)
    return results
