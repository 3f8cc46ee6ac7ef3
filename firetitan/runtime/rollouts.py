"""Rollout workers under a hard staleness bound, and the consumer side that drops what went stale.

Producer: admits a prompt only when `StalenessGate.can_admit()` (sampler at most `bound` steps behind
the trainer, and capacity left for that version), tags the group with the version that produced it,
and sends it into a bounded stream (backpressure when the trainer is behind).
Consumer: `BatchAssembler.next_batch(trainer_step)` takes the oldest groups, trains only those with
`trainer_step - version <= bound`, and gives stale ones back (their prompt is re-issued, the drop is
counted), so the bound holds no matter how sampling and training timings interleave.

Liveness invariant (every wait here has an end condition): a waiting task is woken by the event that
can unblock it, or the loop ends it. The admission wait ends on the next gate change (release, trainer
step, published version); a worker with no position to hand out waits for the next gate change too,
since every give-back of a position releases its slot; and the consumer stops waiting (returns None)
once its buffer holds every outstanding position and the cursor can hand out no other, because then
no further group can ever arrive — the workers are cancelled by the loop when the trainer stops.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from firetitan.runtime.cursor import DataCursor
from firetitan.runtime.remote import call
from firetitan.runtime.run_metrics import RunMetrics
from firetitan.runtime.staleness import StalenessGate, is_trainable, staleness
from firetitan.runtime.versions import PolicyVersion, PolicyVersionRegistry


@dataclass
class RolloutGroup:
    """The samples of one prompt, tagged with the policy version that produced them."""

    position: int  # data-cursor position of the prompt
    version: int  # -1: let the workers tag it with the version admitted under
    samples: list[Any]
    rewards: list[float]
    identity: str | None = None
    started_at: float = 0.0
    finished_at: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


RolloutFn = Callable[[int, PolicyVersion], Awaitable[RolloutGroup | None]]


class Admission:
    """A `StalenessGate` with waiting: callers block until the gate admits them."""

    def __init__(self, gate: StalenessGate) -> None:
        self.gate = gate
        self._changed = anyio.Event()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    async def acquire(self) -> int:
        while not self.gate.can_admit():
            await self._changed.wait()
        return self.gate.admit()

    async def changed(self) -> None:
        """Wait for the next gate change (a slot given back, a trainer step, a published version)."""
        await self._changed.wait()

    def release(self) -> None:
        self.gate.give_back()
        self._notify()

    def set_trainer_step(self, step: int) -> None:
        self.gate.set_trainer_step(step)
        self._notify()

    def set_sampler_version(self, version: int) -> None:
        self.gate.set_sampler_version(version)
        self._notify()


class RolloutWorkers:
    """Runs `rollout_fn(position, policy_version)` for admitted prompts, at most `max_concurrency` at once."""

    def __init__(self, *, admission: Admission, cursor: DataCursor, registry: PolicyVersionRegistry,
                 rollout_fn: RolloutFn, send: MemoryObjectSendStream[RolloutGroup],
                 max_concurrency: int, timeout_s: float, metrics: RunMetrics | None = None,
                 max_consecutive_failures: int = 5) -> None:
        self.admission = admission
        self.cursor = cursor
        self.registry = registry
        self.rollout_fn = rollout_fn
        self.send = send
        self.limiter = anyio.Semaphore(max_concurrency)
        self.timeout_s = timeout_s
        self.metrics = metrics
        self.failures = 0
        self.consecutive_failures = 0
        self.max_consecutive_failures = max_consecutive_failures

    async def run(self) -> None:
        """Admit and run rollouts until cancelled (the owner decides when training is done).

        When the cursor has nothing left to hand out it waits for the next gate change (not a timed
        poll): stale drops and failed rollouts give their prompts back, each with a slot release, and
        those must be redone. If none can come back, the consumer ends the run (`next_batch` -> None).
        """
        async with self.send:
            async with anyio.create_task_group() as tg:
                while True:
                    await self.limiter.acquire()
                    try:
                        await self.admission.acquire()
                    except BaseException:
                        self.limiter.release()
                        raise
                    position = self.cursor.next()
                    if position is None:
                        self.admission.release()
                        self.limiter.release()
                        # No await between next() and this wait, so no give-back can slip by unseen.
                        await self.admission.changed()
                        continue
                    # Read at admission; the registry only moves forward while the rollout runs, so
                    # the tag is never newer than the weights that produced the tokens.
                    pv = self.registry.current()
                    tg.start_soon(self._one, position, pv, self.send.clone())

    async def _one(self, position: int, pv: PolicyVersion, send: MemoryObjectSendStream[RolloutGroup]) -> None:
        async with send:
            try:
                group = await self._attempt(position, pv)
                if group is None:
                    self.cursor.give_back(position)
                    self.admission.release()
                    return
                await send.send(group)
            except BaseException:
                self.cursor.give_back(position)
                self.admission.release()
                raise
            finally:
                self.limiter.release()

    async def _attempt(self, position: int, pv: PolicyVersion) -> RolloutGroup | None:
        started = time.monotonic()
        if self.metrics:
            self.metrics.sampler.enter()
        try:
            group = await call(self.rollout_fn(position, pv), timeout=self.timeout_s,
                               what=f"rollout of prompt {position}")
        except Exception as exc:
            # One bad rollout should not kill the run; a run of them means the service is broken.
            self.failures += 1
            self.consecutive_failures += 1
            if self.metrics:
                self.metrics.log("rollout_failed", None, position=position, error=repr(exc))
            if self.consecutive_failures >= self.max_consecutive_failures:
                raise
            return None
        finally:
            if self.metrics:
                self.metrics.sampler.exit()
        self.consecutive_failures = 0
        if group is None:
            return None
        group.position, group.started_at, group.finished_at = position, started, time.monotonic()
        if group.version < 0:
            group.version = pv.version
        group.identity = group.identity or pv.identity
        return group


class BatchAssembler:
    """Consumer side: builds batches of fresh groups, dropping (and giving back) stale ones."""

    def __init__(self, receive: MemoryObjectReceiveStream[RolloutGroup], *, groups_per_step: int, bound: int,
                 admission: Admission, cursor: DataCursor, metrics: RunMetrics | None = None) -> None:
        self.receive = receive
        self.groups_per_step = groups_per_step
        self.bound = bound
        self.admission = admission
        self.cursor = cursor
        self.metrics = metrics
        self.buffer: list[RolloutGroup] = []
        self.dropped = 0
        self.closed = False
        self.starved = False  # the data ran out: no full batch can be assembled any more

    def _drop(self, group: RolloutGroup, trainer_step: int) -> None:
        self.dropped += 1
        if self.metrics:
            self.metrics.staleness.dropped += 1
            self.metrics.log("stale_drop", trainer_step, version=group.version, position=group.position)
        self.cursor.give_back(group.position)
        self.admission.release()

    async def next_batch(self, trainer_step: int) -> list[RolloutGroup] | None:
        """`groups_per_step` groups all within the bound at `trainer_step`, or None if the stream ended."""
        while True:
            fresh = []
            for g in self.buffer:
                if is_trainable(trainer_step, g.version, self.bound):
                    fresh.append(g)
                else:
                    self._drop(g, trainer_step)
            fresh.sort(key=lambda g: (g.version, g.finished_at))  # oldest first: least likely to go stale
            self.buffer = fresh
            if len(self.buffer) >= self.groups_per_step:
                batch, self.buffer = self.buffer[: self.groups_per_step], self.buffer[self.groups_per_step :]
                for g in batch:
                    if self.metrics:
                        self.metrics.staleness.add(staleness(trainer_step, g.version))
                return batch
            if self.closed:
                return None
            if not self.cursor.can_issue() and self.cursor.outstanding <= len(self.buffer):
                # Every handed-out position is here and none is left to hand out: waiting on the
                # stream would never end (the workers wait for a give-back that cannot happen).
                self.starved = True
                if self.metrics:
                    self.metrics.log("data_exhausted", trainer_step, buffered=len(self.buffer))
                return None
            try:
                self.buffer.append(await self.receive.receive())
            except anyio.EndOfStream:
                self.closed = True
