"""Async RL recipe: the GRPO objective with sampling running ahead of training, within a hard staleness bound."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import Field

from firetitan.recipes.rl import RewardFn, RLConfig, run_rl
from firetitan.recipes.supervised import ProgressFn
from firetitan.runtime.protocols import ServiceLike


class AsyncRLConfig(RLConfig):
    max_steps_off_policy: int = Field(default=1, ge=0, description="hard bound: trainer_step - sample_version")
    # PPO clips the ratio to the *sampling* policy: with samples one step stale, the tokens the last
    # update already moved most (ratio > 1.2 with A > 0) get no gradient, and on the benchmark task
    # async learned ~35% less per step over 32 steps. CISPO weights each token by the truncated ratio
    # instead (a stop-gradient importance weight in [0, 4]), which corrects for staleness without
    # discarding it. On-policy (ratio 1) its gradient equals PPO's, so GRPO is the same objective.
    loss_fn: Literal["ppo", "importance_sampling", "cispo"] = "cispo"


async def async_rl(cfg: AsyncRLConfig, rows: Sequence[Mapping[str, Any]], eval_rows: Sequence[Mapping[str, Any]],
                   reward_fn: RewardFn, *, service: ServiceLike | None = None,
                   on_progress: ProgressFn | None = None) -> dict[str, Any]:
    """Rollouts for step s+1.. are sampled while step s trains; stale samples are never trained on."""
    return await run_rl(cfg, rows, eval_rows, reward_fn, name="async_rl", service=service, on_progress=on_progress)
