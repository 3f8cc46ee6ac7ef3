"""Preference objectives for `forward_backward_custom`: DPO (with reference) and ORPO (without).

Each `*_loss` builder returns `loss_fn(data, logprobs) -> (scalar loss, metrics)` over datums ordered
`[chosen_0, rejected_0, chosen_1, rejected_1, ...]`, reading the completion mask from `weights`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from firetitan.client.custom_loss import CustomLossFn


def _mask(datum: Any) -> torch.Tensor:
    return (datum.loss_fn_inputs["weights"].to_torch().float() > 0).float()


def sequence_logprob(datum: Any, logprobs: torch.Tensor) -> torch.Tensor:
    """Sum of the completion tokens' logprobs."""
    return (logprobs.float() * _mask(datum)).sum()


def mean_logprob(datum: Any, logprobs: torch.Tensor) -> torch.Tensor:
    m = _mask(datum)
    return (logprobs.float() * m).sum() / m.sum().clamp(min=1.0)


def _pairs(data: Sequence[Any]) -> range:
    if len(data) % 2:
        raise ValueError(f"data: expected chosen/rejected pairs, got an odd count {len(data)}")
    return range(0, len(data), 2)


def dpo_loss(reference: Sequence[float], beta: float = 0.1) -> CustomLossFn:
    """`mean(-logsigmoid(beta * ((lp_c - ref_c) - (lp_r - ref_r))))`; `reference` = per-datum sums."""
    if not 0 < beta:
        raise ValueError(f"beta: must be > 0, got {beta}")

    def loss_fn(data: Sequence[Any], logprobs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        if len(reference) != len(data):
            raise ValueError(f"reference: {len(reference)} values for {len(data)} datums")
        margins = []
        for i in _pairs(data):
            chosen = sequence_logprob(data[i], logprobs[i]) - reference[i]
            rejected = sequence_logprob(data[i + 1], logprobs[i + 1]) - reference[i + 1]
            margins.append(beta * (chosen - rejected))
        m = torch.stack(margins)
        loss = -F.logsigmoid(m).mean()
        m = m.detach()
        return loss, {"dpo_loss": float(loss.detach()), "accuracy": float((m > 0).float().mean()),
                      "margin": float(m.mean() / beta)}

    return loss_fn


def log_odds(avg_logprob: torch.Tensor) -> torch.Tensor:
    """log(p / (1 - p)) for p = exp(avg_logprob), stable for p near 0 and 1."""
    lp = avg_logprob.clamp(max=-1e-6)
    return lp - torch.log(-torch.expm1(lp))


def orpo_loss(lam: float = 1.0) -> CustomLossFn:
    """ORPO: chosen NLL (token mean) + `lam` * -logsigmoid(log_odds(chosen) - log_odds(rejected)), batch mean."""

    def loss_fn(data: Sequence[Any], logprobs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        nll, ratio, wins = [], [], []
        for i in _pairs(data):
            c = mean_logprob(data[i], logprobs[i])
            r = mean_logprob(data[i + 1], logprobs[i + 1])
            nll.append(-c)
            diff = log_odds(c) - log_odds(r)
            ratio.append(-F.logsigmoid(diff))
            wins.append(diff > 0)
        sft, odds = torch.stack(nll).mean(), torch.stack(ratio).mean()
        loss = sft + lam * odds
        return loss, {"orpo_loss": float(loss.detach()), "sft_nll": float(sft.detach()),
                      "odds_ratio_loss": float(odds.detach()),
                      "accuracy": float(torch.stack(wins).float().mean())}

    return loss_fn
