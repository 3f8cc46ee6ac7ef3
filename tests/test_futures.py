"""APIFuture: .result() in a plain thread, inside asyncio.run, and from a notebook-style sync call."""

from __future__ import annotations

import asyncio
import concurrent.futures
import subprocess
import sys
import textwrap
import threading

import pytest

from firetitan.futures import (
    APIFuture,
    add_shutdown_hook,
    completed,
    failed,
    get_background_loop,
    in_background_loop,
    remove_shutdown_hook,
    run_coroutine,
    run_sync,
    shutdown_background_loop,
)

# Generous upper bound so a broken implementation fails instead of hanging the suite.
HANG = 30.0


class CustomError(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


async def _work(value: int) -> tuple[int, str]:
    """Awaits more than once, so it needs a live loop to make progress."""
    await asyncio.sleep(0.01)
    await asyncio.sleep(0)
    return value * 2, threading.current_thread().name


async def _boom() -> None:
    await asyncio.sleep(0.01)
    raise CustomError("went wrong", code=7)


def test_result_in_a_plain_thread() -> None:
    value, thread = run_coroutine(_work(21)).result(timeout=HANG)
    assert value == 42
    assert thread == "firetitan-background-loop" != threading.current_thread().name


def test_result_from_another_plain_thread() -> None:
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        got = list(pool.map(lambda v: run_coroutine(_work(v)).result(timeout=HANG)[0], range(4)))
    assert got == [0, 2, 4, 6]


def test_result_inside_asyncio_run() -> None:
    async def main() -> int:
        # Blocks this loop on purpose; the work runs on the background loop, so no deadlock.
        return run_coroutine(_work(5)).result(timeout=HANG)[0]

    assert asyncio.run(main()) == 10


async def test_result_from_sync_function_while_a_loop_runs_in_this_thread() -> None:
    """A notebook cell: sync code, called from a coroutine, with the thread's loop running."""

    def cell() -> int:
        assert asyncio.get_running_loop() is not None  # a loop is running in this very thread
        return run_coroutine(_work(4)).result(timeout=HANG)[0]

    assert cell() == 8


async def test_await_from_the_callers_loop() -> None:
    fut = run_coroutine(_work(3))
    assert (await fut)[0] == 6
    assert (await fut.result_async(timeout=HANG))[0] == 6  # awaiting twice is fine
    assert fut.done()


async def test_await_many_concurrently() -> None:
    futs = [run_coroutine(_work(i)) for i in range(20)]
    results = await asyncio.gather(*futs)
    assert [r[0] for r in results] == [2 * i for i in range(20)]


def test_exception_type_propagates_to_result() -> None:
    fut = run_coroutine(_boom())
    with pytest.raises(CustomError) as info:
        fut.result(timeout=HANG)
    assert info.value.code == 7
    assert isinstance(fut.exception(timeout=HANG), CustomError)


async def test_exception_type_propagates_to_await() -> None:
    with pytest.raises(CustomError, match="went wrong"):
        await run_coroutine(_boom())


def test_exception_type_propagates_inside_asyncio_run() -> None:
    async def main() -> None:
        run_coroutine(_boom()).result(timeout=HANG)

    with pytest.raises(CustomError):
        asyncio.run(main())


def test_cancel_cancels_the_running_task() -> None:
    started, cancelled = threading.Event(), threading.Event()

    async def forever() -> None:
        started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    fut = run_coroutine(forever())
    assert started.wait(HANG)
    assert fut.cancel()
    assert cancelled.wait(HANG), "the coroutine on the background loop was not cancelled"
    assert fut.cancelled() and fut.done()
    with pytest.raises(concurrent.futures.CancelledError):
        fut.result(timeout=HANG)


async def test_cancelled_await_leaves_the_operation_running() -> None:
    gate = threading.Event()

    async def wait_for_gate() -> str:
        await asyncio.to_thread(gate.wait, HANG)
        return "finished"

    fut = run_coroutine(wait_for_gate())
    with pytest.raises(TimeoutError):
        await fut.result_async(timeout=0.05)
    assert not fut.done()
    gate.set()
    assert await fut.result_async(timeout=HANG) == "finished"


def test_result_timeout_raises_timeout_error() -> None:
    fut = run_coroutine(asyncio.sleep(3600))
    with pytest.raises(TimeoutError):
        fut.result(timeout=0.05)
    fut.cancel()


def test_add_done_callback_receives_the_api_future() -> None:
    seen: list[object] = []
    fired = threading.Event()
    fut = run_coroutine(_work(1))

    def callback(f: APIFuture) -> None:
        seen.append(f.result())
        seen.append(f)
        fired.set()

    fut.add_done_callback(callback)
    assert fired.wait(HANG)
    assert seen[0][0] == 2 and seen[1] is fut


def test_add_done_callback_on_finished_future_fires_at_once() -> None:
    seen: list[int] = []
    completed(3).add_done_callback(lambda f: seen.append(f.result()))
    assert seen == [3]


def test_completed_and_failed() -> None:
    assert completed("x").result() == "x" and completed("x").done()
    with pytest.raises(CustomError):
        failed(CustomError("no", 1)).result()


async def test_completed_is_awaitable() -> None:
    assert await completed(5) == 5


def test_map_transforms_and_passes_errors() -> None:
    assert run_coroutine(_work(2)).map(lambda r: r[0] + 1).result(timeout=HANG) == 5
    with pytest.raises(CustomError):
        run_coroutine(_boom()).map(lambda r: r).result(timeout=HANG)
    with pytest.raises(ZeroDivisionError):
        completed(0).map(lambda r: 1 / r).result()


def test_run_sync() -> None:
    assert run_sync(_work(6), timeout=HANG)[0] == 12


def test_result_on_the_background_loop_raises_instead_of_deadlocking() -> None:
    async def inner() -> str:
        assert in_background_loop()
        pending = run_coroutine(asyncio.sleep(0.01))
        with pytest.raises(RuntimeError, match="background loop"):
            pending.result()
        with pytest.raises(RuntimeError, match="background loop"):
            run_sync(asyncio.sleep(0))
        await pending  # awaiting is the right way there
        return "ok"

    assert run_coroutine(inner()).result(timeout=HANG) == "ok"


def test_plain_awaitables_are_accepted() -> None:
    async def make() -> asyncio.Future[int]:
        fut = asyncio.get_running_loop().create_future()
        fut.set_result(9)
        return fut

    loop_future = run_coroutine(make()).result(timeout=HANG)
    assert run_coroutine(loop_future).result(timeout=HANG) == 9


def test_one_background_loop_is_reused() -> None:
    assert get_background_loop() is get_background_loop()
    loops = {run_coroutine(_current_loop()).result(timeout=HANG) for _ in range(3)}
    assert loops == {get_background_loop()}


async def _current_loop() -> asyncio.AbstractEventLoop:
    return asyncio.get_running_loop()


def test_shutdown_runs_hooks_cancels_tasks_and_restarts_lazily() -> None:
    closed, cancelled = threading.Event(), threading.Event()

    async def hook() -> None:
        closed.set()

    async def forever() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    old = get_background_loop()
    add_shutdown_hook(hook)
    fut = run_coroutine(forever())
    run_sync(asyncio.sleep(0.01))  # let it start
    shutdown_background_loop(timeout=HANG)
    remove_shutdown_hook(hook)
    assert closed.is_set() and cancelled.is_set() and fut.cancelled()
    assert old.is_closed()
    assert run_sync(_work(1), timeout=HANG)[0] == 2  # a fresh loop starts on demand
    assert get_background_loop() is not old


def test_interpreter_exit_is_clean_with_work_pending() -> None:
    """atexit stops the daemon loop thread: no hang, no 'Task was destroyed' noise."""
    script = textwrap.dedent(
        """
        import asyncio
        from firetitan.futures import run_coroutine, add_shutdown_hook

        async def hook():
            print("hook ran", flush=True)

        add_shutdown_hook(hook)
        assert run_coroutine(asyncio.sleep(0, result=1)).result() == 1
        run_coroutine(asyncio.sleep(3600))   # left pending on purpose
        print("main done", flush=True)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=HANG)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["main", "done", "hook", "ran"]
    assert "Task was destroyed" not in out.stderr and "Traceback" not in out.stderr


def test_shutdown_hooks_hold_bound_methods_weakly_and_can_be_removed() -> None:
    import gc

    ran: list[str] = []

    class Client:
        def __init__(self, name: str) -> None:
            self.name = name

        async def close(self) -> None:
            ran.append(self.name)

    kept, dropped, removed = Client("kept"), Client("dropped"), Client("removed")
    for client in (kept, dropped, removed):
        add_shutdown_hook(client.close)
    add_shutdown_hook(kept.close)  # registering twice runs it once
    remove_shutdown_hook(removed.close)
    del dropped
    gc.collect()
    run_sync(asyncio.sleep(0))  # make sure a loop exists to shut down
    shutdown_background_loop(timeout=HANG)
    assert ran == ["kept"]
