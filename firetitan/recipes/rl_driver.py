"""The part of an RL recipe run that every RL recipe shares: periodic jobs, the step loop, the final saves, the summary.

A recipe (GRPO / async RL in `rl.py`, IGPO / distillation in `episode_loop.py`) brings what differs —
how a group is sampled (`rollout`), how a batch becomes an update (`train_step`) and how the policy is
evaluated (`evaluate`) — and `drive_rl` runs them: weight syncs and train states every N steps, the
initial and final evals, a final train state and snapshot so the run ends resumable and evaluated, and
the run summary, written even when the run is cancelled.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from firetitan.runtime.periodic import Pending, PeriodicJob, PeriodicTasks, due
from firetitan.runtime.pipeline import StepResult
from firetitan.runtime.remote import call
from firetitan.runtime.rl_loop import RLLoop, RLLoopSettings
from firetitan.runtime.rollouts import RolloutGroup
from firetitan.runtime.versions import PolicyVersion

if TYPE_CHECKING:
    from firetitan.recipes.rl import RLConfig
    from firetitan.recipes.run_setup import RLRun


@dataclass
class Saved:
    """How far the run's side effects have got: the last step whose train state is recorded, the last
    step whose weights the deployment serves, and the policy version last evaluated."""

    state: int
    sync: int
    eval: int | None = None


@dataclass
class RecipeSteps:
    """What a recipe brings to `drive_rl`.

    `evaluate(step, policy)` scores the served `policy` for an eval requested at `step` (the driver
    picks the policy and skips weights already evaluated); `on_step(record)` sees every step's
    metrics record; `summary()` adds the recipe's own entries to the run summary.
    """

    rollout: Callable[[int, PolicyVersion], Awaitable[RolloutGroup]]
    train_step: Callable[[int, list[RolloutGroup]], Awaitable[None]]
    evaluate: Callable[[int, PolicyVersion], Awaitable[None]]
    on_step: Callable[[dict[str, Any]], None]
    summary: Callable[[], dict[str, Any]] = dict


def report_results(run: RLRun, results: Sequence[StepResult]) -> None:
    """Log the trainer's results of finished steps (loss, ratio, ...) at the step they produced."""
    for r in results:
        run.metrics.log("train_result", r.step + 1, latency_s=round(r.latency_s, 4), **r.metrics)


async def drive_rl(cfg: RLConfig, run: RLRun, training: Any, steps: RecipeSteps, *, name: str,
                   has_evals: bool, last_eval: dict[str, Any]) -> dict[str, Any]:
    metrics, registry, cursor, start_step = run.metrics, run.registry, run.cursor, run.start_step
    saved = Saved(state=start_step, sync=start_step)

    async def evaluate(step: int, _: Any = None, __: Any = None) -> None:
        # An eval at a step whose sync is due scores that very step's weights, once served.
        if due(step, cfg.sync_every) or step == start_step:
            await registry.wait_for(step)
        pv = registry.current()
        if saved.eval == pv.version:
            return  # these weights were evaluated already
        await steps.evaluate(step, pv)
        saved.eval = pv.version

    async def publish(step: int, result: Any, submitted_at: Any) -> None:
        loading = time.monotonic()
        await run.hot_load(result.path)
        registry.publish(step, result.path)
        saved.sync = step
        done = time.monotonic()
        # snapshot_s: queued behind the step's training + written; hot_load_s: until the deployment serves it
        metrics.log("weight_sync", step, identity=result.path, hot_load_s=round(done - loading, 4),
                    snapshot_s=round(loading - submitted_at, 4) if submitted_at is not None else None)

    async def record_state(step: int, result: Any, cursor_state: Any) -> None:
        run.checkpoints.record(step, result.path, cursor_state)
        saved.state = step

    jobs = [
        PeriodicJob("sync", cfg.sync_every, timeout_s=cfg.timeout_s, finish=publish,
                    submit=lambda step: Pending(training.save_weights_for_sampler(f"{name}-step-{step:06d}"),
                                                time.monotonic())),
        PeriodicJob("state", cfg.save_every, timeout_s=cfg.timeout_s, finish=record_state,
                    submit=lambda step: Pending(training.save_state(f"{name}-state-{step:06d}", overwrite=True),
                                                cursor.state())),
    ]
    if has_evals:
        jobs.append(PeriodicJob("eval", cfg.eval_every, timeout_s=cfg.timeout_s, finish=evaluate,
                                submit=lambda step: Pending(None), skip_if_busy=True))
    loop = RLLoop(RLLoopSettings(steps=cfg.steps, groups_per_step=cfg.groups_per_step,
                                 max_steps_off_policy=cfg.max_steps_off_policy,
                                 max_concurrency=cfg.max_concurrent_rollouts, rollout_timeout_s=cfg.rollout_timeout_s),
                  cursor=cursor, registry=registry, rollout_fn=steps.rollout, train_step=steps.train_step,
                  periodic=PeriodicTasks(jobs), metrics=metrics, start_step=start_step, on_step=steps.on_step)
    try:
        if has_evals and start_step == 0:
            await call(evaluate(start_step), timeout=cfg.timeout_s, what="initial eval")
        await loop.run()
        report_results(run, await run.pipeline.drain())
        final = loop.trainer_step
        if saved.state < final:
            res = await call(training.save_state(f"{name}-state-{final:06d}", overwrite=True), timeout=cfg.timeout_s,
                             what="final save_state")
            await record_state(final, res, cursor.state())
        if has_evals and saved.eval != final:
            if saved.sync < final:
                res = await call(training.save_weights_for_sampler(f"{name}-step-{final:06d}"),
                                 timeout=cfg.timeout_s, what="final sampler snapshot")
                await call(publish(final, res, None), timeout=cfg.timeout_s, what="final weight sync")
            await call(evaluate(final), timeout=cfg.timeout_s, what="final eval")
    finally:
        run.pipeline.abandon()
        summary = {**metrics.summary(), "final_step": loop.trainer_step, "start_step": start_step,
                   "last_eval": last_eval, "evals": metrics.evals, "dropped": metrics.staleness.dropped,
                   **steps.summary(), "plot": metrics.try_plot()}
        metrics.log("run_end", loop.trainer_step, **{k: v for k, v in summary.items() if k != "evals"})
        metrics.close()
    return summary
