"""Paper over the transformers 4.x / 5.x rename of the KV-cache argument (`past_key_values` → `cache`)."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from transformers import PreTrainedModel


def cache_arg_name(model: PreTrainedModel) -> str:
    """The keyword this model's `forward` takes its KV cache under (and the output field it returns)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def forward_with_cache(
    model: PreTrainedModel, input_ids: torch.Tensor, cache: Any = None, **kwargs: Any
) -> tuple[torch.Tensor, Any]:
    """One forward step with a KV cache: returns (logits, cache to pass to the next step)."""
    name = cache_arg_name(model)
    out = model(input_ids=input_ids, use_cache=True, **{name: cache}, **kwargs)
    return out.logits, getattr(out, name)
