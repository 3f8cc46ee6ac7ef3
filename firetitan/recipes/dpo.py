"""DPO recipe: reference logprobs computed once (cached on disk), DPO loss through forward_backward_custom."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import Field

from firetitan.recipes.clients import open_clients
from firetitan.recipes.config import RecipeConfig
from firetitan.recipes.data import supervised_datum
from firetitan.recipes.objectives import dpo_loss
from firetitan.recipes.supervised import Evaluation, ProgressFn, StepInputs, run_supervised
from firetitan.recipes.text import encode_completion, encode_prompt, masked_logprobs
from firetitan.runtime.protocols import ServiceLike
from firetitan.runtime.remote import call

Pair = Mapping[str, str]  # {"prompt", "chosen", "rejected"}


class DPOConfig(RecipeConfig):
    learning_rate: float = Field(default=5e-4, gt=0)
    batch_size: int = Field(default=4, ge=1, description="preference pairs per step")
    epochs: int = Field(default=1, ge=1)
    beta: float = Field(default=0.1, gt=0, lt=1.0)
    reference_batch: int = Field(default=32, ge=1)


def pair_datums(tokenizer: Any, pair: Pair) -> list[Any]:
    prompt = encode_prompt(tokenizer, pair["prompt"])
    return [supervised_datum(prompt, encode_completion(tokenizer, pair["chosen"])),
            supervised_datum(prompt, encode_completion(tokenizer, pair["rejected"]))]


class ReferenceCache:
    """Per-datum reference logprob sums, computed once by the reference client and kept in a JSON file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.values: dict[str, list[float]] = json.loads(path.read_text()) if path.exists() else {}

    async def fill(self, reference: Any, keyed: dict[str, list[Any]], batch: int, timeout_s: float) -> int:
        missing = [k for k in keyed if k not in self.values]
        for start in range(0, len(missing), batch):
            keys = missing[start : start + batch]
            data = [d for k in keys for d in keyed[k]]
            out = await call(reference.forward(data, "cross_entropy"), timeout=timeout_s,
                             what="reference forward")
            sums = [sum(masked_logprobs(o, d)) for o, d in zip(out.loss_fn_outputs, data, strict=True)]
            for i, k in enumerate(keys):
                self.values[k] = sums[2 * i : 2 * i + 2]
        if missing:
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.values))
            tmp.replace(self.path)
        return len(missing)

    def get(self, key: str) -> list[float]:
        return self.values[key]


def _score(output: Any, datum: Any, per_token: bool) -> float:
    lp = masked_logprobs(output, datum)
    return sum(lp) / len(lp) if per_token else sum(lp)


def preference_scores(data: Sequence[Any], outputs: Sequence[Any], reference: Sequence[float] | None,
                      beta: float = 1.0, *, per_token: bool = False) -> dict[str, float]:
    """Pairwise accuracy and mean margin, chosen vs rejected: (policy - reference) logprob sums for DPO,
    or per-token mean logprobs (`per_token`, what ORPO's odds compare) without a reference."""
    wins, margins = [], []
    for i in range(0, len(data), 2):
        c = _score(outputs[i], data[i], per_token) - (reference[i] if reference else 0.0)
        r = _score(outputs[i + 1], data[i + 1], per_token) - (reference[i + 1] if reference else 0.0)
        wins.append(c > r)
        margins.append(beta * (c - r))
    return {"eval_pref_accuracy": sum(wins) / len(wins), "eval_margin": sum(margins) / len(margins)}


async def dpo(cfg: DPOConfig, train: Sequence[Pair], eval_set: Sequence[Pair] = (), *, service: ServiceLike | None = None,
              on_progress: ProgressFn | None = None) -> dict[str, Any]:
    """Direct preference optimisation on `{"prompt", "chosen", "rejected"}` rows."""
    cfg.log_dir.mkdir(parents=True, exist_ok=True)
    async with open_clients(cfg, name="dpo", deployment=False, reference=True, service=service) as clients:
        tok = clients.tokenizer
        train_data = {f"train-{i}": pair_datums(tok, p) for i, p in enumerate(train)}
        eval_data = {f"eval-{i}": pair_datums(tok, p) for i, p in enumerate(eval_set)}
        cache = ReferenceCache(cfg.log_dir / "reference_logprobs.json")
        computed = await cache.fill(clients.reference, {**train_data, **eval_data}, cfg.reference_batch,
                                    cfg.timeout_s)

        async def build_step(indices: list[int]) -> StepInputs:
            keys = [f"train-{i}" for i in indices]
            data = [d for k in keys for d in train_data[k]]
            ref = [v for k in keys for v in cache.get(k)]
            return StepInputs(data, custom_loss=dpo_loss(ref, cfg.beta))

        evaluation = None
        if eval_set:
            data = [d for k in eval_data for d in eval_data[k]]
            ref = [v for k in eval_data for v in cache.get(k)]
            evaluation = Evaluation(prompts=[dict(p) for p in eval_set], data=data,
                                    score=lambda outs: preference_scores(data, outs, ref, cfg.beta))
        summary = await run_supervised(cfg, clients, name="dpo", dataset_size=len(train), batch_size=cfg.batch_size,
                                       epochs=cfg.epochs, build_step=build_step, evaluation=evaluation,
                                       on_progress=on_progress)
        return {**summary, "reference_logprobs_computed": computed}
