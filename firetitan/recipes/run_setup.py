"""The start of every RL-style run: resume, first sampler snapshot + hot-load, version registry, trainer pipeline."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from firetitan.recipes.clients import Clients
from firetitan.recipes.run_state import RunCheckpoints
from firetitan.runtime.cursor import DataCursor
from firetitan.runtime.pipeline import TrainerPipeline
from firetitan.runtime.remote import call
from firetitan.runtime.run_metrics import RunMetrics
from firetitan.runtime.versions import PolicyVersionRegistry
from firetitan.types import AdamParams

if TYPE_CHECKING:  # rl.py imports this module
    from firetitan.recipes.rl import RLConfig


@dataclass
class RLRun:
    """What a recipe's step loop starts from; `start_step` is where the resumed (or fresh) run begins."""

    checkpoints: RunCheckpoints
    cursor: DataCursor
    start_step: int
    metrics: RunMetrics
    hot_load: Callable[[str], Awaitable[None]]
    registry: PolicyVersionRegistry
    pipeline: TrainerPipeline
    adam: AdamParams
    loss_config: dict[str, Any] | None


async def start_rl_run(cfg: RLConfig, clients: Clients, num_rows: int, *, name: str,
                       init_state: str | None = None) -> RLRun:
    """Resume from the last recorded train state (if any; else load `init_state`, if given, weights only), then
    make the deployment serve the trainer's weights."""
    training = clients.training
    assert clients.hot_load is not None
    checkpoints = RunCheckpoints(cfg.log_dir)
    cursor = DataCursor(num_rows, epochs=None, seed=cfg.seed)
    cursor, start_step, rec = await checkpoints.resume(training, cursor, enabled=cfg.resume, timeout_s=cfg.timeout_s)
    if rec is None and init_state is not None:  # a warm start; a resumed run already holds its own weights
        await call(training.load_state(init_state), timeout=cfg.timeout_s, what=f"loading init_state {init_state}")
    metrics = RunMetrics(cfg.log_dir, run_name=name, resume_step=start_step)
    metrics.log("run_start", start_step, total_steps=cfg.steps, max_steps_off_policy=cfg.max_steps_off_policy,
                resumed_from=rec and rec["state_path"], init_state=init_state if rec is None else None)

    # The deployment must serve exactly the trainer's weights before the first rollout (a fresh
    # deployment serves the base model; a resumed trainer has moved on).
    snap = await call(training.save_weights_for_sampler(f"{name}-step-{start_step:06d}"), timeout=cfg.timeout_s,
                      what="initial sampler snapshot")
    await clients.hot_load(snap.path)
    pipeline = TrainerPipeline(training, max_in_flight=cfg.max_in_flight, timeout_s=cfg.timeout_s,
                               busy=metrics.trainer)
    loss_config = {"clip_low_threshold": cfg.clip_low, "clip_high_threshold": cfg.clip_high} \
        if cfg.loss_fn == "ppo" else None
    return RLRun(checkpoints=checkpoints, cursor=cursor, start_step=start_step, metrics=metrics,
                 hot_load=clients.hot_load, registry=PolicyVersionRegistry(snap.path, initial_version=start_step),
                 pipeline=pipeline, adam=AdamParams(learning_rate=cfg.learning_rate), loss_config=loss_config)
