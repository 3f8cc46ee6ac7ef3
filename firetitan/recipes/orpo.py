"""ORPO recipe: no reference model; SFT on the chosen answer plus an odds-ratio term, via forward_backward_custom."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import Field

from firetitan.recipes.clients import open_clients
from firetitan.recipes.config import RecipeConfig
from firetitan.recipes.dpo import pair_datums, preference_scores
from firetitan.recipes.objectives import orpo_loss
from firetitan.recipes.supervised import Evaluation, ProgressFn, StepInputs, run_supervised
from firetitan.runtime.protocols import ServiceLike


class ORPOConfig(RecipeConfig):
    learning_rate: float = Field(default=5e-4, gt=0)
    batch_size: int = Field(default=4, ge=1, description="preference pairs per step")
    epochs: int = Field(default=1, ge=1)
    orpo_lambda: float = Field(default=1.0, ge=0)


async def orpo(cfg: ORPOConfig, train: Sequence[Mapping[str, str]], eval_set: Sequence[Mapping[str, str]] = (), *,
               service: ServiceLike | None = None, on_progress: ProgressFn | None = None) -> dict[str, Any]:
    """Odds-ratio preference optimisation on `{"prompt", "chosen", "rejected"}` rows."""
    async with open_clients(cfg, name="orpo", deployment=False, service=service) as clients:
        tok = clients.tokenizer
        loss = orpo_loss(cfg.orpo_lambda)

        async def build_step(indices: list[int]) -> StepInputs:
            return StepInputs([d for i in indices for d in pair_datums(tok, train[i])], custom_loss=loss)

        evaluation = None
        if eval_set:
            data = [d for p in eval_set for d in pair_datums(tok, p)]
            evaluation = Evaluation(prompts=[dict(p) for p in eval_set], data=data,
                                    score=lambda outs: preference_scores(data, outs, None, per_token=True))
        return await run_supervised(cfg, clients, name="orpo", dataset_size=len(train), batch_size=cfg.batch_size,
                                    epochs=cfg.epochs, build_step=build_step, evaluation=evaluation,
                                    on_progress=on_progress)
