"""GRPO recipe: on-policy (max_steps_off_policy = 0), group-relative advantages, PPO-clipped loss."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

from firetitan.recipes.rl import RewardFn, RLConfig, run_rl
from firetitan.recipes.supervised import ProgressFn
from firetitan.runtime.protocols import ServiceLike


class GRPOConfig(RLConfig):
    max_steps_off_policy: Literal[0] = 0
    sync_every: Literal[1] = 1


async def grpo(cfg: GRPOConfig, rows: Sequence[Mapping[str, Any]], eval_rows: Sequence[Mapping[str, Any]],
               reward_fn: RewardFn, *, service: ServiceLike | None = None, on_progress: ProgressFn | None = None) -> dict[str, Any]:
    """Sample a batch with the current weights, train one step on it, sync, repeat."""
    return await run_rl(cfg, rows, eval_rows, reward_fn, name="grpo", service=service, on_progress=on_progress)
