"""Seq-ordered calls to a trainer: reserve seq_ids, submit in that order, give up the ones that never arrive.

A seq_id is reserved when an operation is *called*; the turn gate lets submissions through in seq
order; a seq that never reaches the server (cancelled, failed to send, 429) is released there so
later ones are not held back. `TrainingClient` builds its operations on `SeqOrderedCalls`.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import Any

from firetitan.client.http import HttpClient
from firetitan.client.training_wire import worker_crashed
from firetitan.errors import ConflictError, FiretitanError
from firetitan.futures import APIFuture, get_background_loop, run_coroutine

API = "/api/v1"


class TurnGate:
    """Lets submissions through in seq order. A seq that is never submitted must still be finished."""

    def __init__(self, first: int) -> None:
        self._done = first - 1
        self._finished: set[int] = set()
        self._waiters: dict[int, asyncio.Future[None]] = {}

    async def wait(self, seq: int) -> None:
        if seq - 1 <= self._done:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters[seq] = fut
        try:
            await fut
        finally:
            self._waiters.pop(seq, None)

    def passed(self, seq: int) -> bool:
        return seq <= self._done or seq in self._finished

    def finish(self, seq: int) -> None:
        if self.passed(seq):
            return
        self._finished.add(seq)
        while self._done + 1 in self._finished:
            self._done += 1
            self._finished.discard(self._done)
        waiter = self._waiters.get(self._done + 1)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)



class SeqOrderedCalls:
    """Submits one model's operations to a trainer in the order they were called (thread-safe)."""

    def __init__(self, http: HttpClient, model_id: str, session_id: str, poll_seconds: float) -> None:
        self.http = http
        self.model_id = model_id
        self.poll_seconds = poll_seconds
        # Per-client id: suffixes snapshot names and keys this client's seq_id sequence on the server.
        self.session_id = session_id
        self._seq_lock = threading.Lock()
        self._next_seq = 1
        self._gate = TurnGate(first=1)
        self._releases: set[asyncio.Task[Any]] = set()
        self._closed = False

    def _reserve(self, n: int = 1) -> int:
        with self._seq_lock:
            if self._closed:
                raise RuntimeError("TrainingClient is closed")
            seq = self._next_seq
            self._next_seq += n
            return seq

    async def _submit(self, endpoint: str, body: dict[str, Any], seq: int) -> str:
        """POST in seq order; returns the request id. A seq that never reaches the server is released."""
        reached = False
        try:
            await self._gate.wait(seq)
            accepted = await self.http.request_json(
                "POST", f"{API}/{endpoint}",
                json={**body, "model_id": self.model_id, "seq_id": seq, "session_id": self.session_id})
            reached = True
            return str(accepted["request_id"])
        except FiretitanError as exc:
            # A 4xx means the server saw the request and consumed its seq_id when rejecting it; a 429
            # (full queue) leaves it free, so it is released here.
            reached = reached or (400 <= exc.status_code < 500 and exc.status_code != 429)
            raise
        finally:
            if not reached:
                self._release(seq)
            self._gate.finish(seq)

    def _release(self, seq: int) -> None:
        """Tell the server `seq` will never come, so later submissions are not held back (best effort)."""

        async def send() -> None:
            with contextlib.suppress(Exception):
                await self.http.request_json("POST", f"{API}/release_seq", retry=False, timeout=10.0, json={
                    "model_id": self.model_id, "seq_id": seq, "session_id": self.session_id})

        task = asyncio.get_running_loop().create_task(send())
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)

    async def _result(self, request_id: str) -> dict[str, Any]:
        """Long-poll `retrieve_future` until the result (or its typed error) arrives."""
        while True:
            body = await self.http.request_json(
                "POST", f"{API}/retrieve_future", json={"request_id": request_id, "timeout": self.poll_seconds},
                timeout=self.poll_seconds + 30.0)
            if isinstance(body, dict) and body.get("type") == "try_again":
                continue
            return body

    async def _call(self, endpoint: str, body: dict[str, Any], seq: int) -> dict[str, Any]:
        try:
            return await self._result(await self._submit(endpoint, body, seq))
        except ConflictError as exc:
            crashed = worker_crashed(exc)
            if crashed is None:
                raise
            raise crashed from exc

    def _op(self, endpoint: str, body: dict[str, Any], parse: Callable[[dict[str, Any]], Any]) -> APIFuture[Any]:
        seq = self._reserve()

        async def run() -> Any:
            return parse(await self._call(endpoint, body, seq))

        return self._guard(run_coroutine(run()), seq)

    def _guard(self, fut: APIFuture[Any], *seqs: int) -> APIFuture[Any]:
        """If `fut` is cancelled before its coroutine ran, its seq_ids must still be given up."""
        loop = get_background_loop()

        def on_done(f: APIFuture[Any]) -> None:
            if f.cancelled():
                loop.call_soon_threadsafe(self._abandon, seqs)

        fut.add_done_callback(on_done)
        return fut

    def _abandon(self, seqs: tuple[int, ...]) -> None:
        for seq in seqs:
            if not self._gate.passed(seq):
                self._release(seq)
                self._gate.finish(seq)
