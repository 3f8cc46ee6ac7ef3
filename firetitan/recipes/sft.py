"""SFT recipe: built-in cross-entropy on completions, steps pipelined ahead on the trainer."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import Field

from firetitan.recipes.clients import open_clients
from firetitan.recipes.config import RecipeConfig
from firetitan.recipes.data import supervised_datum
from firetitan.recipes.supervised import Evaluation, ProgressFn, StepInputs, run_supervised
from firetitan.recipes.text import encode_completion, encode_prompt, masked_logprobs
from firetitan.runtime.protocols import ServiceLike


class SFTConfig(RecipeConfig):
    batch_size: int = Field(default=8, ge=1)
    epochs: int = Field(default=1, ge=1)


def _datum(tokenizer: Any, row: Mapping[str, str], weight: float) -> Any:
    return supervised_datum(encode_prompt(tokenizer, row["prompt"]), encode_completion(tokenizer, row["completion"]),
                            weight=weight)


def nll_scores(data: Sequence[Any], outputs: Sequence[Any]) -> dict[str, float]:
    """Mean per-token NLL of the completions and the mean probability of a whole completion."""
    nll, prob = [], []
    for d, o in zip(data, outputs, strict=True):
        lp = masked_logprobs(o, d)
        nll.append(-sum(lp) / len(lp))
        prob.append(math.exp(sum(lp)))
    return {"eval_nll": sum(nll) / len(nll), "eval_completion_prob": sum(prob) / len(prob)}


async def sft(cfg: SFTConfig, train: Sequence[Mapping[str, str]], eval_set: Sequence[Mapping[str, str]] = (), *,
              service: ServiceLike | None = None, on_progress: ProgressFn | None = None) -> dict[str, Any]:
    """Supervised fine-tuning on `{"prompt", "completion"}` rows; returns the run summary."""
    async with open_clients(cfg, name="sft", deployment=False, service=service) as clients:
        tok = clients.tokenizer

        async def build_step(indices: list[int]) -> StepInputs:
            # weight 1/batch: the summed loss is the batch's mean per-token NLL
            return StepInputs([_datum(tok, train[i], 1.0 / len(indices)) for i in indices])

        evaluation = None
        if eval_set:
            data = [_datum(tok, r, 1.0) for r in eval_set]
            evaluation = Evaluation(prompts=[dict(r) for r in eval_set], data=data,
                                    score=lambda outs: nll_scores(data, outs))
        return await run_supervised(cfg, clients, name="sft", dataset_size=len(train), batch_size=cfg.batch_size,
                                    epochs=cfg.epochs, build_step=build_step, evaluation=evaluation,
                                    on_progress=on_progress)
