"""APIFuture: one result that can be awaited or blocked on, and the SDK's background event-loop thread.

Every SDK operation runs as a coroutine on ONE event loop owned by the SDK, in a daemon thread started
on first use (`get_background_loop()`). The caller gets an `APIFuture` around the
`concurrent.futures.Future` of that coroutine, so it can:

- `await fut` (or `await fut.result_async()`) from any event loop, in any thread;
- `fut.result()` from a plain script, from inside `asyncio.run(...)`, or from a sync function called
  while a loop runs in the same thread (a notebook cell). Only the calling thread blocks; the work runs
  on the background loop, so the caller's blocked loop is never needed and nothing deadlocks.

Rule for code scheduled here: everything it awaits must belong to the background loop. In particular an
`aiohttp.ClientSession` is bound to the loop that created it, which is why `firetitan.client.http`
keeps one session per loop; a coroutine run through `run_coroutine` gets the background loop's session.
Calling `.result()` ON the background loop (from a coroutine it runs) would block the loop that must
produce the value, so it raises instead.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import inspect
import os
import threading
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Generator
from typing import Any, Generic, TypeVar

__all__ = [
    "APIFuture",
    "add_shutdown_hook",
    "completed",
    "failed",
    "get_background_loop",
    "in_background_loop",
    "remove_shutdown_hook",
    "run_coroutine",
    "run_sync",
    "shutdown_background_loop",
]

T = TypeVar("T")
U = TypeVar("U")

_THREAD_NAME = "firetitan-background-loop"
_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None
_thread: threading.Thread | None = None
# Bound methods are held weakly, so a client that registers `self.close` can still be garbage collected.
_shutdown_hooks: list[Callable[[], Callable[[], Awaitable[None]] | None]] = []


# ---------------------------------------------------------------------------------------------- loop


def _run_loop(loop: asyncio.AbstractEventLoop, started: threading.Event) -> None:
    asyncio.set_event_loop(loop)
    loop.call_soon(started.set)
    loop.run_forever()


def get_background_loop() -> asyncio.AbstractEventLoop:
    """The SDK's event loop, running in a daemon thread; started on first call (and after a shutdown)."""
    global _loop, _thread
    with _lock:
        if _loop is not None and _thread is not None and _thread.is_alive() and not _loop.is_closed():
            return _loop
        loop = asyncio.new_event_loop()
        started = threading.Event()
        thread = threading.Thread(target=_run_loop, args=(loop, started), name=_THREAD_NAME, daemon=True)
        thread.start()
        started.wait()
        _loop, _thread = loop, thread
        return loop


def in_background_loop() -> bool:
    """True when called from the background loop's own thread."""
    return _thread is not None and threading.current_thread() is _thread


def _ref(hook: Callable[[], Awaitable[None]]) -> Callable[[], Callable[[], Awaitable[None]] | None]:
    if inspect.ismethod(hook):
        return weakref.WeakMethod(hook)
    return lambda: hook


def add_shutdown_hook(hook: Callable[[], Awaitable[None]]) -> None:
    """Run `await hook()` on the background loop when it shuts down (e.g. to close HTTP sessions).

    Hooks run before the remaining tasks are cancelled; each gets a few seconds. A bound method is
    held weakly: once its object is garbage collected the hook is dropped.
    """
    with _lock:
        _shutdown_hooks[:] = [r for r in _shutdown_hooks if r() is not None and r() != hook]
        _shutdown_hooks.append(_ref(hook))


def remove_shutdown_hook(hook: Callable[[], Awaitable[None]]) -> None:
    """Forget a hook added with `add_shutdown_hook` (e.g. when its client was closed already)."""
    with _lock:
        _shutdown_hooks[:] = [r for r in _shutdown_hooks if r() is not None and r() != hook]


async def _drain(hook_timeout: float) -> None:
    with _lock:
        hooks = [h for h in (r() for r in _shutdown_hooks) if h is not None]
    for hook in hooks:
        # A failing or hanging hook must not stop the rest of the shutdown.
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await asyncio.wait_for(hook(), hook_timeout)
    me = asyncio.current_task()
    tasks = [t for t in asyncio.all_tasks() if t is not me]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await asyncio.get_running_loop().shutdown_asyncgens()


def shutdown_background_loop(timeout: float = 5.0) -> None:
    """Run the shutdown hooks, cancel every task on the background loop, stop and close it.

    Idempotent; called automatically at interpreter exit. A later `run_coroutine` starts a fresh loop.
    """
    global _loop, _thread
    if in_background_loop():
        raise RuntimeError("shutdown_background_loop() cannot be called from the background loop itself")
    with _lock:
        loop, thread = _loop, _thread
        _loop = _thread = None
    if loop is None or loop.is_closed():
        return
    if thread is not None and thread.is_alive():
        drained = asyncio.run_coroutine_threadsafe(_drain(hook_timeout=timeout / 2), loop)
        with contextlib.suppress(Exception):
            drained.result(timeout)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)
    if not loop.is_running():
        loop.close()


def _forget_loop_in_child() -> None:
    # A forked child has the parent's loop object but not its thread; start afresh on next use.
    global _loop, _thread
    _loop = _thread = None


atexit.register(shutdown_background_loop)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_loop_in_child)


# ---------------------------------------------------------------------------------------------- future


def _relay_to_loop(source: concurrent.futures.Future[T], target: asyncio.Future[T]) -> None:
    """Copy a finished concurrent future's outcome into an asyncio future on another loop."""

    def copy() -> None:
        if target.done():
            return
        if source.cancelled():
            target.cancel()
            return
        exc = source.exception()
        if exc is not None:
            target.set_exception(exc)
        else:
            target.set_result(source.result())

    loop = target.get_loop()
    if loop.is_closed():  # the awaiting loop went away; nobody is left to tell
        return
    with contextlib.suppress(RuntimeError):  # closed between the check and the call
        loop.call_soon_threadsafe(copy)


class APIFuture(Generic[T]):
    """The eventual result of one SDK operation: `await fut`, `fut.result()`, or callbacks.

    Wraps a `concurrent.futures.Future`. Exceptions come back as raised (same type, same object).
    Cancelling an *await* (e.g. the awaiting task is cancelled) does not cancel the operation;
    `fut.cancel()` does.
    """

    __slots__ = ("_future",)

    def __init__(self, future: concurrent.futures.Future[T]) -> None:
        self._future = future

    # -- blocking
    def result(self, timeout: float | None = None) -> T:
        """Block the calling thread until the value is ready; raises the operation's own exception.

        Raises `TimeoutError` after `timeout` seconds (the operation keeps running) and
        `concurrent.futures.CancelledError` if it was cancelled.
        """
        if not self._future.done() and in_background_loop():
            raise RuntimeError(
                "APIFuture.result() was called on the SDK background loop, which must produce the value; "
                "use `await fut` there instead"
            )
        return self._future.result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """Block until done; the exception the operation raised, or None."""
        if not self._future.done() and in_background_loop():
            raise RuntimeError("APIFuture.exception() would deadlock on the SDK background loop")
        return self._future.exception(timeout)

    # -- awaiting
    async def result_async(self, timeout: float | None = None) -> T:
        """Await the value from any event loop; raises `TimeoutError` after `timeout` seconds."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[T] = loop.create_future()
        self._future.add_done_callback(lambda src: _relay_to_loop(src, waiter))
        # shield: a timed-out or cancelled await leaves the operation (and other awaiters) alone.
        shielded = asyncio.shield(waiter)
        if timeout is None:
            return await shielded
        return await asyncio.wait_for(shielded, timeout)

    def __await__(self) -> Generator[Any, None, T]:
        return self.result_async().__await__()

    def coroutine(self) -> Coroutine[Any, Any, T]:
        """A coroutine for `asyncio.create_task` (Tinker's `APIFuture.coroutine()`)."""
        return self.result_async()

    # -- state
    def done(self) -> bool:
        return self._future.done()

    def cancelled(self) -> bool:
        return self._future.cancelled()

    def cancel(self) -> bool:
        """Cancel the operation (its task on the background loop); False if it already finished."""
        return self._future.cancel()

    def add_done_callback(self, fn: Callable[[APIFuture[T]], object]) -> None:
        """Call `fn(self)` when done: at once if already done, else in the thread that finishes it.

        Keep `fn` quick; an exception it raises is logged by `concurrent.futures`, not propagated.
        """
        self._future.add_done_callback(lambda _src: fn(self))

    def future(self) -> concurrent.futures.Future[T]:
        """The underlying `concurrent.futures.Future` (cancelling it cancels the operation)."""
        return self._future

    def map(self, fn: Callable[[T], U]) -> APIFuture[U]:
        """A future of `fn(result)`; errors and cancellation pass through (cancelling it cancels self)."""
        out: concurrent.futures.Future[U] = concurrent.futures.Future()

        def forward(src: concurrent.futures.Future[T]) -> None:
            if src.cancelled():
                out.cancel()
            elif not out.set_running_or_notify_cancel():
                return
            elif (exc := src.exception()) is not None:
                out.set_exception(exc)
            else:
                try:
                    out.set_result(fn(src.result()))
                except BaseException as err:  # the transform's own error is the result
                    out.set_exception(err)

        out.add_done_callback(lambda o: self._future.cancel() if o.cancelled() else None)
        self._future.add_done_callback(forward)
        return APIFuture(out)

    def __repr__(self) -> str:
        state = "cancelled" if self.cancelled() else "done" if self.done() else "pending"
        return f"<APIFuture {state}>"


# ---------------------------------------------------------------------------------------------- helpers


async def _await(awaitable: Awaitable[T]) -> T:
    return await awaitable


def run_coroutine(coro: Awaitable[T]) -> APIFuture[T]:
    """Schedule `coro` on the background loop and return its APIFuture at once."""
    if not asyncio.iscoroutine(coro):
        coro = _await(coro)
    try:
        loop = get_background_loop()
        return APIFuture(asyncio.run_coroutine_threadsafe(coro, loop))
    except BaseException:
        coro.close()  # never scheduled: close it so Python does not warn "never awaited"
        raise


def run_sync(coro: Awaitable[T], timeout: float | None = None) -> T:
    """Run `coro` on the background loop and block for its value (for sync facades over async code)."""
    if in_background_loop():
        if asyncio.iscoroutine(coro):
            coro.close()
        raise RuntimeError("run_sync() cannot block the SDK background loop; await the coroutine instead")
    return run_coroutine(coro).result(timeout)


def completed(value: T) -> APIFuture[T]:
    """An APIFuture that already holds `value`."""
    fut: concurrent.futures.Future[T] = concurrent.futures.Future()
    fut.set_result(value)
    return APIFuture(fut)


def failed(exc: BaseException) -> APIFuture[Any]:
    """An APIFuture that already holds the exception `exc`."""
    fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
    fut.set_exception(exc)
    return APIFuture(fut)
