"""Async RL recipe: the GRPO objective with sampling running ahead of training, within a hard staleness bound."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import Field

from firetitan.recipes.rl import RewardFn, RLConfig, run_rl
from firetitan.recipes.supervised import ProgressFn


class AsyncRLConfig(RLConfig):
    max_steps_off_policy: int = Field(default=1, ge=0, description="hard bound: trainer_step - sample_version")


async def async_rl(cfg: AsyncRLConfig, rows: Sequence[Mapping[str, Any]], eval_rows: Sequence[Mapping[str, Any]],
                   reward_fn: RewardFn, *, service: Any = None,
                   on_progress: ProgressFn | None = None) -> dict[str, Any]:
    """Rollouts for step s+1.. are sampled while step s trains; stale samples are never trained on."""
    return await run_rl(cfg, rows, eval_rows, reward_fn, name="async_rl", service=service, on_progress=on_progress)
