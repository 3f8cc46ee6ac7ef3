"""Tokenizing recipe rows: prompt text to ids, completion text to ids ending in EOS."""

from __future__ import annotations

from typing import Any


def encode_prompt(tokenizer: Any, text: str) -> list[int]:
    return [int(t) for t in tokenizer.encode(text, add_special_tokens=False)]


def encode_completion(tokenizer: Any, text: str) -> list[int]:
    """The completion's tokens plus EOS, so the model also learns where to stop."""
    return [*encode_prompt(tokenizer, text), int(tokenizer.eos_token_id)]


def masked_logprobs(output: Any, datum: Any) -> list[float]:
    """The logprobs of a datum's trained (weight > 0) positions from a forward output."""
    lp = output["logprobs"].tolist()
    w = datum.loss_fn_inputs["weights"].tolist()
    return [float(x) for x, wi in zip(lp, w, strict=True) if wi > 0]
