"""The bounded off-policy RL loop: rollout workers, the trainer loop and periodic jobs in one task group.

`max_steps_off_policy = 0` is synchronous on-policy RL (sampling for step s+1 starts only once the
weights of step s+1 are served); `> 0` overlaps sampling with training, never beyond the bound.
The loop knows nothing of HTTP: it calls `rollout_fn`, `train_step` and the periodic jobs it is given.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import anyio

from firetitan.runtime.cursor import DataCursor
from firetitan.runtime.periodic import PeriodicTasks
from firetitan.runtime.rollouts import Admission, BatchAssembler, RolloutFn, RolloutGroup, RolloutWorkers
from firetitan.runtime.run_metrics import RunMetrics
from firetitan.runtime.staleness import StalenessGate, staleness
from firetitan.runtime.versions import PolicyVersion, PolicyVersionRegistry

TrainStepFn = Callable[[int, list[RolloutGroup]], Awaitable[None]]


@dataclass
class RLLoopSettings:
    steps: int  # stop once the trainer has submitted this many optimizer steps
    groups_per_step: int
    max_steps_off_policy: int
    max_concurrency: int
    rollout_timeout_s: float
    queue_size: int | None = None  # completed groups waiting for the trainer; default one step's worth

    def validate(self, sync_every: int) -> None:
        if sync_every < 1 or sync_every > self.max_steps_off_policy + 1:
            raise ValueError(
                f"sync_every: must be in 1..max_steps_off_policy+1 = {self.max_steps_off_policy + 1}, got "
                f"{sync_every}; a longer gap would stall admission forever"
            )


class RLLoop:
    """Owns the admission gate, the rollout stream and the trainer-step counter of one run."""

    def __init__(self, settings: RLLoopSettings, *, cursor: DataCursor, registry: PolicyVersionRegistry,
                 rollout_fn: RolloutFn, train_step: TrainStepFn, periodic: PeriodicTasks,
                 metrics: RunMetrics, start_step: int = 0,
                 on_step: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.settings = settings
        self.cursor = cursor
        self.registry = registry
        self.rollout_fn = rollout_fn
        self.train_step = train_step
        self.periodic = periodic
        self.metrics = metrics
        self.trainer_step = start_step
        self.on_step = on_step
        served = registry.current().version
        self.admission = Admission(StalenessGate(
            bound=settings.max_steps_off_policy, groups_per_step=settings.groups_per_step,
            trainer_step=start_step, sampler_version=served,
            # groups already trained before a resume count as admitted, so capacity math lines up
            admitted=start_step * settings.groups_per_step,
        ))
        registry.add_listener(self._on_publish)
        self.trained: list[tuple[int, int, int]] = []  # (trainer_step, version, position) of every trained group

    def _on_publish(self, pv: PolicyVersion) -> None:
        self.admission.set_sampler_version(self.registry.oldest_served())

    async def run(self) -> None:
        """Train until `steps`, cancellation, or the data running out (a finite cursor).

        Every wait has an end condition: the trainer's wait for a batch ends with a batch or None
        (`BatchAssembler.next_batch`: stream closed, or no prompt can come back); its wait on a
        periodic job's one-slot queue ends when that job's current run ends, itself bounded by the
        job's `timeout_s`; rollout workers wait on the gate, which every trainer step, publish and
        give-back wakes, and are cancelled here once the trainer stops; every remote call is bounded
        by a deadline (`remote.call`).
        """
        s = self.settings
        send, receive = anyio.create_memory_object_stream[RolloutGroup](s.queue_size or s.groups_per_step)
        workers = RolloutWorkers(admission=self.admission, cursor=self.cursor, registry=self.registry,
                                 rollout_fn=self.rollout_fn, send=send, max_concurrency=s.max_concurrency,
                                 timeout_s=s.rollout_timeout_s, metrics=self.metrics)
        assembler = BatchAssembler(receive, groups_per_step=s.groups_per_step, bound=s.max_steps_off_policy,
                                   admission=self.admission, cursor=self.cursor, metrics=self.metrics)
        async with anyio.create_task_group() as outer:
            # Periodic workers live in the outer group so that saves and syncs already on the trainer's
            # queue land after the loop ends; rollouts live in the inner one and are cancelled then.
            self.periodic.start(outer)
            try:
                async with receive, anyio.create_task_group() as inner:
                    inner.start_soon(workers.run, name="rollout-workers")
                    await self._train(assembler)
                    inner.cancel_scope.cancel()  # rollouts still running are for steps we will not take
            finally:
                self.periodic.close()

    async def _train(self, assembler: BatchAssembler) -> None:
        s = self.settings
        last = time.monotonic()
        while self.trainer_step < s.steps:
            wait_started = time.monotonic()
            batch = await assembler.next_batch(self.trainer_step)
            if batch is None:
                break
            waited = time.monotonic() - wait_started
            await self.train_step(self.trainer_step, batch)
            # Only a step that was submitted counts: a cancel inside train_step leaves these
            # prompts untrained, and the cursor will hand them out again after a resume.
            self.trained.extend((self.trainer_step, g.version, g.position) for g in batch)
            self.cursor.mark_trained([g.position for g in batch])
            self.trainer_step += 1
            self.admission.set_trainer_step(self.trainer_step)
            now = time.monotonic()
            rewards = [r for g in batch for r in g.rewards]
            rec = self.metrics.log_step(
                self.trainer_step, step_time_s=round(now - last, 4), wait_for_data_s=round(waited, 4),
                reward=sum(rewards) / len(rewards) if rewards else None,
                staleness_max=max(staleness(self.trainer_step - 1, g.version) for g in batch),
                sampler_version=self.registry.current().version, dropped=assembler.dropped,
                positions=[g.position for g in batch],
            )
            last = now
            if self.on_step:
                self.on_step(rec)
            await self.periodic.after_step(self.trainer_step)
