"""Pure sampling math: per-row temperature / top-k / top-p, raw and sampling logprobs, seeded draws."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SampleResult:
    """One sampled token per row with both logprobs (float32, on CPU)."""

    tokens: torch.Tensor  # [B] int64
    logprobs: torch.Tensor  # [B] log p(token) under the untempered model distribution
    sampling_logprobs: torch.Tensor  # [B] log q(token) under the distribution actually sampled from
    raw: torch.Tensor  # [B, V] untempered log-probabilities (for top_logprobs)


def sampling_log_probs(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                       top_p: torch.Tensor) -> torch.Tensor:
    """Log-probabilities of the distribution sampled from, after temperature, top-k and top-p.

    `logits` is [B, V]; `temperature`/`top_p` are float [B], `top_k` int [B] (0 = off).
    Rows with temperature 0 are treated as temperature 1 here; the caller takes argmax for them.
    Filtered-out tokens get -inf.
    """
    logits = logits.float()
    temp = torch.where(temperature > 0, temperature, torch.ones_like(temperature))
    scaled = logits / temp.unsqueeze(1)
    vocab = scaled.shape[1]
    need_k = bool(((top_k > 0) & (top_k < vocab)).any())
    need_p = bool((top_p < 1.0).any())
    if not (need_k or need_p):
        return torch.log_softmax(scaled, dim=-1)
    sorted_logits, order = torch.sort(scaled, dim=-1, descending=True)
    ranks = torch.arange(vocab).unsqueeze(0)
    drop = torch.zeros_like(sorted_logits, dtype=torch.bool)
    if need_k:
        k = torch.where(top_k > 0, top_k, torch.full_like(top_k, vocab)).clamp(max=vocab)
        drop |= ranks >= k.unsqueeze(1)
    if need_p:
        # Nucleus over what top-k left: keep the smallest prefix whose mass reaches top_p
        # (a token is dropped when the mass strictly before it already reaches top_p).
        probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs
        drop |= mass_before >= top_p.unsqueeze(1)
    drop[:, 0] = False  # the most likely token always survives
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    filtered = torch.full_like(scaled, float("-inf")).scatter(1, order, sorted_logits)
    return torch.log_softmax(filtered, dim=-1)


def sample(logits: torch.Tensor, temperature: Sequence[float], top_k: Sequence[int], top_p: Sequence[float],
           generators: Sequence[torch.Generator | None], default_generator: torch.Generator | None = None
           ) -> SampleResult:
    """Draw one token per row of `logits` [B, V].

    Temperature 0 is greedy (sampling logprob 0: the sampled distribution is a point mass). Rows with
    their own generator (a request `seed`) draw from it, so a seeded request is reproducible whatever
    else shares its batch.
    """
    logits = logits.float()
    temp_t = torch.tensor(temperature, dtype=torch.float32)
    raw = torch.log_softmax(logits, dim=-1)
    vocab = logits.shape[1]
    if all(t == 1.0 for t in temperature) and all(k <= 0 or k >= vocab for k in top_k) and all(
            p >= 1.0 for p in top_p):
        samp = raw  # plain sampling (the common RL setting): the sampled distribution is the model's
    else:
        samp = sampling_log_probs(logits, temp_t, torch.tensor(top_k, dtype=torch.int64),
                                  torch.tensor(top_p, dtype=torch.float32))
    # Inverse-CDF sampling: one uniform per row (from the row's own generator when seeded), located in
    # the row's cumulative distribution. Filtered-out tokens have zero mass, so they are never drawn.
    uniform = torch.empty(len(generators))
    shared = [i for i, g in enumerate(generators) if g is None]
    if shared:
        uniform[shared] = torch.rand(len(shared), generator=default_generator)
    seeded = [i for i, g in enumerate(generators) if g is not None]
    if seeded:  # one draw per seeded row from its own generator, written back in one op
        uniform[seeded] = torch.cat([torch.rand(1, generator=generators[i]) for i in seeded])
    cdf = torch.cumsum(torch.exp(samp), dim=-1)
    total = cdf[:, -1]
    # Strictly below the total, so the first entry above it always has positive mass.
    target = torch.minimum(uniform * total, torch.nextafter(total, torch.zeros_like(total)))
    drawn = torch.searchsorted(cdf, target.unsqueeze(1), right=True).squeeze(1)
    rows = torch.arange(logits.shape[0])
    if any(t <= 0 for t in temperature):
        is_greedy = temp_t <= 0
        tokens = torch.where(is_greedy, torch.argmax(logits, dim=-1), drawn)
        samp_lp = torch.where(is_greedy, torch.zeros(len(rows)), samp[rows, tokens])
    else:
        tokens, samp_lp = drawn, samp[rows, drawn]
    return SampleResult(tokens=tokens, logprobs=raw[rows, tokens], sampling_logprobs=samp_lp, raw=raw)
