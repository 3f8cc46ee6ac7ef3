"""Recipes: SFT, DPO, ORPO, GRPO and async RL as async functions with one pydantic config each."""

from firetitan.recipes.async_rl import AsyncRLConfig, async_rl
from firetitan.recipes.config import RecipeConfig
from firetitan.recipes.dpo import DPOConfig, dpo
from firetitan.recipes.grpo import GRPOConfig, grpo
from firetitan.recipes.orpo import ORPOConfig, orpo
from firetitan.recipes.rl import RLConfig
from firetitan.recipes.sft import SFTConfig, sft

__all__ = ["AsyncRLConfig", "DPOConfig", "GRPOConfig", "ORPOConfig", "RLConfig", "RecipeConfig", "SFTConfig",
           "async_rl", "dpo", "grpo", "orpo", "sft"]
