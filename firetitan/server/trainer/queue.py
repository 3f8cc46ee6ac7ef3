"""Request futures (long-polled results with bounded retention) and per-model `seq_id` ordering.

A submission becomes a `Job` holding a blocking function. Each model has one `RequestQueue` whose
single worker task runs jobs one at a time, in `seq_id` order per client session, with the torch
work in a thread (`anyio.to_thread`) so the event loop stays free for health checks and long polls.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anyio

from firetitan.errors import APIStatusError, ConflictError, FiretitanError, NotFoundError
from firetitan.logging import get_logger

log = get_logger("firetitan.server.trainer")


@dataclass
class FutureRecord:
    """One submission's outcome: pending until `done` is set, then a JSON body and its HTTP status."""

    request_id: str
    kind: str
    model_id: str
    created: float = field(default_factory=time.monotonic)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    status: int = 200
    body: dict[str, Any] | None = None
    # Set when the submission was refused before it was queued: a retry of its seq_id gets this again.
    rejected: FiretitanError | None = None

    def finish(self, status: int, body: dict[str, Any]) -> None:
        self.status, self.body = status, body
        self.done.set()


class FutureStore:
    """Every future of this worker, by request id. Finished ones are kept (newest `retention`) so a
    client that reconnects can retrieve a result again; pending ones are never evicted."""

    def __init__(self, retention: int = 4096) -> None:
        self.retention = retention
        self._records: OrderedDict[str, FutureRecord] = OrderedDict()
        self._counter = itertools.count(1)
        self._prefix = secrets.token_hex(3)

    def new(self, kind: str, model_id: str) -> FutureRecord:
        rid = f"{self._prefix}-{next(self._counter)}"
        rec = FutureRecord(request_id=rid, kind=kind, model_id=model_id)
        self._records[rid] = rec
        self._evict()
        return rec

    def get(self, request_id: str) -> FutureRecord:
        rec = self._records.get(request_id)
        if rec is None:
            raise NotFoundError(f"request_id {request_id!r} is unknown or its result has expired",
                                field="request_id")
        return rec

    def _evict(self) -> None:
        excess = len(self._records) - self.retention
        if excess <= 0:
            return
        for rid in [rid for rid, rec in self._records.items() if rec.done.is_set()][:excess]:
            del self._records[rid]

    def fail_pending(self, status: int, body: dict[str, Any]) -> int:
        """Finish every pending future with this error (the worker is going down); returns how many."""
        pending = [rec for rec in self._records.values() if not rec.done.is_set()]
        for rec in pending:
            rec.finish(status, body)
        return len(pending)

    def __len__(self) -> int:
        return len(self._records)


@dataclass
class Job:
    record: FutureRecord
    fn: Callable[[], dict[str, Any]]


# Per session, the request ids of this many recent seq_ids are kept for idempotent retries.
SEEN_PER_SESSION = 4096
# Sessions (clients) remembered per model; the oldest idle ones are forgotten beyond this.
MAX_SESSIONS = 1024
# Jobs one model holds queued or waiting for an earlier seq_id; a submission beyond it is a 429.
MAX_WAITING = 1024
_SKIPPED = object()  # placeholder for a seq_id that was rejected or released: nothing to run


@dataclass
class _Session:
    next_seq: int
    pending: dict[int, Job | object] = field(default_factory=dict)
    # (seq_id -> request_id) of recent submissions, so a retried submit gets the same future back.
    seen: OrderedDict[int, str] = field(default_factory=OrderedDict)


class RequestQueue:
    """Runs one model's jobs strictly one at a time: in `seq_id` order within a client session,
    arrival order across sessions and for submissions without a `seq_id`."""

    def __init__(self, futures: FutureStore, model_id: str) -> None:
        self.futures = futures
        self.model_id = model_id
        self._ready: asyncio.Queue[Job] = asyncio.Queue()
        self._sessions: dict[str, _Session] = {}
        self._task: asyncio.Task[None] | None = None
        self.busy = False
        self.busy_since: float | None = None  # monotonic start of the job running now

    # -- submission
    def lookup(self, session: str | None, seq_id: int | None) -> str | None:
        """The request id already given to this (session, seq_id), for idempotent retries."""
        if seq_id is None:
            return None
        sess = self._sessions.get(session or "")
        return None if sess is None else sess.seen.get(seq_id)

    def submit(self, kind: str, fn: Callable[[], dict[str, Any]], *, session: str | None,
               seq_id: int | None) -> FutureRecord:
        """Queue `fn`; returns its future record at once."""
        known = self.lookup(session, seq_id)
        if known is not None:
            return self.futures.get(known)
        if self.waiting() >= MAX_WAITING:
            # Not a refusal of the request itself: its seq_id stays free for the client's retry.
            raise APIStatusError(f"model_id {self.model_id!r} already has {MAX_WAITING} jobs waiting; retry later",
                                 field="model_id", status_code=429)
        rec = self.futures.new(kind, self.model_id)
        job = Job(rec, fn)
        if seq_id is None:
            self._ready.put_nowait(job)
            return rec
        sess = self._claim(session, seq_id)
        sess.pending[seq_id] = job
        self._remember(sess, seq_id, rec.request_id)
        self._drain(sess)
        return rec

    def known(self, session: str | None, seq_id: int | None) -> FutureRecord | None:
        """The future already given to (session, seq_id); re-raises the error of a refused one."""
        rid = self.lookup(session, seq_id)
        if rid is None:
            return None
        rec = self.futures.get(rid)
        if rec.rejected is not None:
            raise rec.rejected
        return rec

    def reject(self, kind: str, error: FiretitanError, *, session: str | None,
               seq_id: int | None) -> FutureRecord | None:
        """Consume `seq_id` with a future that already failed with `error`.

        For a submission refused before it reached the queue (a schema error, a bad loss input...):
        without this the seq_id would stay a gap and hold the session's next call back forever.
        None when there is nothing to consume (no seq_id, already used, or held by another submission).
        """
        if seq_id is None:
            return None
        rid = self.lookup(session, seq_id)
        if rid is not None:  # a retry of a refused submission gets the same future; an accepted one is no concern
            rec = self.futures.get(rid)
            return rec if rec.rejected is not None else None
        sess = self._sessions.get(session or "")
        if sess is not None and (seq_id < sess.next_seq or seq_id in sess.pending):
            return None
        rec = self.futures.new(kind, self.model_id)
        rec.rejected = error
        rec.finish(error.status_code, error.to_body())
        sess = self._claim(session, seq_id)
        sess.pending[seq_id] = _SKIPPED
        self._remember(sess, seq_id, rec.request_id)
        self._drain(sess)
        log.info("submission_rejected", kind=kind, model_id=self.model_id, seq_id=seq_id,
                 error=type(error).__name__, field=error.field)
        return rec

    def _remember(self, sess: _Session, seq_id: int, request_id: str) -> None:
        sess.seen[seq_id] = request_id
        while len(sess.seen) > SEEN_PER_SESSION:
            sess.seen.popitem(last=False)

    def release(self, session: str | None, seq_id: int | None) -> None:
        """Mark `seq_id` as consumed without work (it was rejected, or the client gave it up)."""
        if seq_id is None or self.lookup(session, seq_id) is not None:
            return
        sess = self._sessions.get(session or "")
        if sess is not None and (seq_id < sess.next_seq or seq_id in sess.pending):
            return
        sess = self._claim(session, seq_id)
        sess.pending[seq_id] = _SKIPPED
        self._drain(sess)

    def _claim(self, session: str | None, seq_id: int) -> _Session:
        key = session or ""
        sess = self._sessions.get(key)
        if sess is None:
            # A new session starts at its first seq_id (Tinker starts at 1, create-via-load at 0).
            sess = self._sessions[key] = _Session(next_seq=seq_id)
            self._evict_sessions()
        if seq_id < sess.next_seq or seq_id in sess.pending:
            raise ConflictError(
                f"seq_id {seq_id} was already used in this session (next expected {sess.next_seq})",
                field="seq_id",
            )
        return sess

    def _evict_sessions(self) -> None:
        # Every client brings its own session id: forget the oldest idle ones beyond the bound.
        excess = len(self._sessions) - MAX_SESSIONS
        for key in [k for k, v in self._sessions.items() if not v.pending][:max(0, excess)]:
            del self._sessions[key]

    def _drain(self, sess: _Session) -> None:
        while sess.next_seq in sess.pending:
            item = sess.pending.pop(sess.next_seq)
            if isinstance(item, Job):
                self._ready.put_nowait(item)
            sess.next_seq += 1

    def waiting(self) -> int:
        """Jobs queued or held back by a gap in seq_ids."""
        held = sum(len(s.pending) for s in self._sessions.values())
        return self._ready.qsize() + held

    # -- execution
    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"queue-{self.model_id}")

    async def close(self) -> None:
        """Stop the worker task; jobs not yet run finish with a 404 (the model is gone)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        gone = NotFoundError(f"model_id {self.model_id!r} was unloaded", field="model_id")
        pending: list[Job] = []
        while not self._ready.empty():
            pending.append(self._ready.get_nowait())
        for sess in self._sessions.values():
            pending.extend(j for j in sess.pending.values() if isinstance(j, Job))
            sess.pending.clear()
        for job in pending:
            job.record.finish(gone.status_code, gone.to_body())

    async def _run(self) -> None:
        while True:
            job = await self._ready.get()
            self.busy, self.busy_since = True, time.monotonic()
            try:
                await self._execute(job)
            finally:
                self.busy, self.busy_since = False, None

    async def _execute(self, job: Job) -> None:
        rec = job.record
        started = time.monotonic()
        try:
            # Not abandoned on cancel: torch work in flight finishes before the model can be dropped.
            body = await anyio.to_thread.run_sync(job.fn)
        except asyncio.CancelledError:
            gone = NotFoundError(f"model_id {self.model_id!r} was unloaded", field="model_id")
            rec.finish(gone.status_code, gone.to_body())
            raise
        except FiretitanError as exc:
            rec.finish(exc.status_code, exc.to_body())
        except Exception as exc:  # a failing job must not stop the queue
            log.exception("job_failed", kind=rec.kind, model_id=self.model_id, request_id=rec.request_id)
            rec.finish(500, {"error": {"type": "InternalError", "message": f"{type(exc).__name__}: {exc}",
                                       "field": None}})
        else:
            rec.finish(200, body)
        log.debug("job_done", kind=rec.kind, request_id=rec.request_id, status=rec.status,
                  seconds=round(time.monotonic() - started, 4))
