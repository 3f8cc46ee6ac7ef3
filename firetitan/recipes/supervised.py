"""The loop SFT, DPO and ORPO share: batches from a resumable cursor, pipelined steps, periodic saves/evals."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import anyio

from firetitan.client.custom_loss import CustomLossFn
from firetitan.recipes.clients import Clients
from firetitan.recipes.config import RecipeConfig
from firetitan.recipes.run_state import RunCheckpoints
from firetitan.runtime.cursor import DataCursor
from firetitan.runtime.periodic import Pending, PeriodicJob, PeriodicTasks
from firetitan.runtime.pipeline import StepResult, TrainerPipeline
from firetitan.runtime.remote import call
from firetitan.runtime.run_metrics import RunMetrics
from firetitan.types import AdamParams, Datum

ProgressFn = Callable[[int, int, dict[str, Any]], None]


@dataclass
class StepInputs:
    data: list[Datum]
    custom_loss: CustomLossFn | None = None  # None: built-in cross_entropy
    meta: dict[str, Any] | None = None


@dataclass
class Evaluation:
    """A trainer-side eval: `data` is forwarded; `score(outputs)` turns logprobs into eval_* metrics."""

    prompts: list[Any]  # the exact prompt set, recorded (file + sha256) with every eval
    data: list[Datum]
    score: Callable[[list[Any]], dict[str, float]]


def remaining_positions(cursor: DataCursor) -> int | None:
    state = cursor.state()
    return None if cursor.limit is None else cursor.limit - state["next"] + len(state["redo"])


async def _both(snapshot: Any, forward: Any, timeout_s: float) -> tuple[Any, Any]:
    return (await call(snapshot, timeout=timeout_s, what="eval snapshot"),
            await call(forward, timeout=timeout_s, what="eval forward"))


async def run_supervised(cfg: RecipeConfig, clients: Clients, *, name: str, dataset_size: int, batch_size: int,
                         epochs: int, build_step: Callable[[list[int]], Awaitable[StepInputs]],  # dataset indices
                         evaluation: Evaluation | None, on_progress: ProgressFn | None = None) -> dict[str, Any]:
    training = clients.training
    checkpoints = RunCheckpoints(cfg.log_dir)
    cursor = DataCursor(dataset_size, epochs=epochs, seed=cfg.seed)
    cursor, start_step, rec = await checkpoints.resume(training, cursor, enabled=cfg.resume, timeout_s=cfg.timeout_s)
    metrics = RunMetrics(cfg.log_dir, run_name=name, resume_step=start_step)
    left = remaining_positions(cursor)
    total = cfg.steps if left is None else min(cfg.steps, start_step + left // batch_size)
    metrics.log("run_start", start_step, total_steps=total, resumed_from=rec and rec["state_path"])
    pipeline = TrainerPipeline(training, max_in_flight=cfg.max_in_flight, timeout_s=cfg.timeout_s,
                               busy=metrics.trainer)
    adam = AdamParams(learning_rate=cfg.learning_rate)
    last_eval: dict[str, Any] = {}
    last_saved = {"step": start_step}

    async def save_finish(step: int, result: Any, cursor_state: Any) -> None:
        checkpoints.record(step, result.path, cursor_state)
        last_saved["step"] = step

    async def eval_finish(step: int, result: Any, _: Any) -> None:
        snapshot, fwd = result
        scores = evaluation.score(list(fwd.loss_fn_outputs))  # type: ignore[union-attr]
        last_eval.update(metrics.record_eval(step, evaluation.prompts, snapshot.path, scores))  # type: ignore[union-attr]

    jobs = [PeriodicJob("state", cfg.save_every, timeout_s=cfg.timeout_s, finish=save_finish,
                        submit=lambda step: Pending(training.save_state(f"{name}-state-{step:06d}", overwrite=True), cursor.state()))]
    if evaluation is not None:
        jobs.append(PeriodicJob(
            "eval", cfg.eval_every, timeout_s=cfg.timeout_s, finish=eval_finish,
            submit=lambda step: Pending(_both(training.save_weights_for_sampler(f"{name}-eval-{step:06d}"),
                                              training.forward(evaluation.data, "cross_entropy"), cfg.timeout_s))))
    periodic = PeriodicTasks(jobs)
    last_done = time.monotonic()

    def report(results: Sequence[StepResult]) -> None:
        nonlocal last_done
        for r in results:
            now = time.monotonic()
            m = r.metrics
            rec = metrics.log_step(r.step + 1, step_time_s=round(now - last_done, 4), latency_s=round(r.latency_s, 4),
                                   loss=m.get("loss:sum"), **{k: v for k, v in m.items() if k != "loss:sum"},
                                   **(r.meta or {}))
            last_done = now
            if on_progress:
                on_progress(r.step + 1, total, {**rec, **last_eval})

    try:
        async with anyio.create_task_group() as tg:
            periodic.start(tg)
            try:
                if evaluation is not None:
                    await periodic.run_now("eval", start_step)
                for step in range(start_step, total):
                    positions = [p for p in (cursor.next() for _ in range(batch_size)) if p is not None]
                    indices = [cursor.index(p) for p in positions]
                    inputs = await build_step(indices)
                    report(await pipeline.submit(step, inputs.data, adam, custom_loss=inputs.custom_loss,
                                                 meta={"indices": indices, **(inputs.meta or {})}))
                    cursor.mark_trained(positions)
                    await periodic.after_step(step + 1)
                report(await pipeline.drain())
                if total > last_saved["step"] and not (cfg.save_every and total % cfg.save_every == 0):
                    await periodic.run_now("state", total)
                if evaluation is not None:
                    await periodic.run_now("eval", total)
            finally:
                periodic.close()
    finally:
        pipeline.abandon()
        summary = {**metrics.summary(), "final_step": total, "start_step": start_step, "last_eval": last_eval,
                   "evals": metrics.evals, "plot": metrics.try_plot()}
        metrics.log("run_end", total, **{k: v for k, v in summary.items() if k != "evals"})
        metrics.close()
    return summary
