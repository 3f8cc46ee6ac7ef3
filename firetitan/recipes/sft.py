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
from firetitan.types import Datum, ModelInput, TensorData


class SFTConfig(RecipeConfig):
    batch_size: int = Field(default=8, ge=1)
    epochs: int = Field(default=1, ge=1)


def demonstration_datum(tokens: Sequence[int], mask: Sequence[int], *, weight: float = 1.0) -> Datum:
    """Next-token datum over a whole token-exact episode that trains only its model tokens (`mask` = 1).

    Each model token gets `weight / sum(mask)`, so the summed CE is the episode's mean model-token NLL.
    """
    if len(tokens) != len(mask) or not any(mask[1:]):
        raise ValueError(f"mask: {len(mask)} entries for {len(tokens)} tokens, and a model token after the first "
                         "position is needed")
    per_token = weight / sum(mask[1:])
    return Datum(model_input=ModelInput.from_ints(list(tokens[:-1])),
                 loss_fn_inputs={"target_tokens": TensorData.model_validate(
                                     {"data": [int(t) for t in tokens[1:]], "dtype": "int64",
                                      "shape": [len(tokens) - 1]}),
                                 "weights": TensorData.model_validate(
                                     {"data": [per_token * float(m) for m in mask[1:]], "dtype": "float32",
                                      "shape": [len(tokens) - 1]})})


def _datum(tokenizer: Any, row: Mapping[str, Any], weight: float) -> Any:
    if "tokens" in row:  # a token-exact episode (firetitan.envs.demos): no re-tokenization
        return demonstration_datum(row["tokens"], row["mask"], weight=weight)
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


async def sft(cfg: SFTConfig, train: Sequence[Mapping[str, Any]], eval_set: Sequence[Mapping[str, Any]] = (), *,
              service: ServiceLike | None = None, on_progress: ProgressFn | None = None) -> dict[str, Any]:
    """Supervised fine-tuning on `{"prompt", "completion"}` (text) or `{"tokens", "mask"}` (token-exact
    episode) rows; returns the run summary."""
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
