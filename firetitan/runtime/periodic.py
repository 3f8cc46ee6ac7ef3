"""Periodic jobs beside training: sampler snapshot + weight sync, train-state saves, evaluation.

A job's trainer call is *submitted* inside the train loop right after the step it belongs to (so the
trainer's seq_id ordering puts it after that step's optim_step and before the next forward_backward);
waiting for it and the follow-up work (hot-load, eval, cursor file) run in the job's own task, so the
train loop does not block. Each job has a one-slot queue: if a job falls more than one run behind,
the train loop waits (backpressure) instead of piling up work.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import anyio
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from firetitan.runtime.remote import DEFAULT_TIMEOUT_S, call


@dataclass
class Pending:
    """What a job's `submit` may return: the queued future plus context captured at submit time."""

    future: Any
    context: Any = None


def due(step: int, every: int) -> bool:
    """A job with period `every` (0 = never) runs after steps every, 2*every, ..."""
    return every > 0 and step > 0 and step % every == 0


@dataclass
class PeriodicJob:
    name: str
    every: int
    submit: Callable[[int], Any]  # sync; returns a future already queued on the trainer, or a Pending
    finish: Callable[[int, Any, Any], Awaitable[None]] | None = None  # (step, result, context)
    timeout_s: float = DEFAULT_TIMEOUT_S
    skip_if_busy: bool = False  # observations (evals) skip a run instead of holding the train loop


class PeriodicTasks:
    """Owns one worker task per job inside the caller's task group; `aclose` drains them."""

    def __init__(self, jobs: list[PeriodicJob]) -> None:
        self.jobs = {j.name: j for j in jobs}
        self.completed: dict[str, list[int]] = {j.name: [] for j in jobs}
        self._streams: dict[str, tuple[MemoryObjectSendStream[Any], MemoryObjectReceiveStream[Any]]] = {}
        self._last_run: dict[str, int] = {}
        self.skipped: dict[str, list[int]] = {}

    def start(self, tg: TaskGroup) -> None:
        for job in self.jobs.values():
            send, receive = anyio.create_memory_object_stream[tuple[int, Any]](1)
            self._streams[job.name] = (send, receive)
            tg.start_soon(self._worker, job, receive, name=f"periodic:{job.name}")

    async def after_step(self, step: int) -> None:
        for job in self.jobs.values():
            if due(step, job.every):
                await self.run_now(job.name, step)

    async def run_now(self, name: str, step: int) -> None:
        """Submit job `name` for `step` now (at most once per step)."""
        if self._last_run.get(name) == step:
            return
        self._last_run[name] = step
        job = self.jobs[name]
        send = self._streams[name][0]
        if job.skip_if_busy and send.statistics().current_buffer_used >= 1:
            self.skipped.setdefault(name, []).append(step)
            return
        await send.send((step, job.submit(step)))

    async def _worker(self, job: PeriodicJob, receive: MemoryObjectReceiveStream[tuple[int, Any]]) -> None:
        async with receive:
            async for step, submitted in receive:
                pending = submitted if isinstance(submitted, Pending) else Pending(submitted)
                result = await call(pending.future, timeout=job.timeout_s, what=f"{job.name} at step {step}")
                if job.finish is not None:
                    await call(job.finish(step, result, pending.context), timeout=job.timeout_s, what=f"{job.name} follow-up at step {step}")
                self.completed[job.name].append(step)

    def close(self) -> None:
        """No more submissions: workers finish what is queued, then exit."""
        for send, _ in self._streams.values():
            send.close()
