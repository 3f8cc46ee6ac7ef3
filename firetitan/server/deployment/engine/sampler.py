"""Pure sampling math: per-row temperature / top-k / top-p, raw and sampling logprobs, seeded draws."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import torch


@dataclass(frozen=True)
class SampleResult:
    """One sampled token per row with both logprobs (float32, on CPU)."""

    tokens: torch.Tensor  # [B] int64
    logprobs: torch.Tensor  # [B] log p(token) under the untempered model distribution
    sampling_logprobs: torch.Tensor  # [B] log q(token) under the distribution actually sampled from
    logits: torch.Tensor  # [B, V] float32, what `raw` is computed from

    @cached_property
    def raw(self) -> torch.Tensor:
        """[B, V] untempered log-probabilities (for top_logprobs), computed on first use only."""
        return torch.log_softmax(self.logits, dim=-1)


# Inverse-CDF draws locate the target in per-block sums first, then inside one block: a cumulative sum
# over the whole vocabulary is a sequential scan (310 us for 128 x 4096 floats here, against 25 us for
# the block sums), and it was most of a small model's sampling time.
_CDF_BLOCK = 64

# Candidates looked at before a full sort: top-k / top-p of a peaked distribution decide within a few
# dozen tokens, and `topk` of 64 costs a fraction of sorting the whole vocabulary for every row.
_WINDOW = 64


def sampling_log_probs(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                       top_p: torch.Tensor) -> torch.Tensor:
    """Log-probabilities of the distribution sampled from, after temperature, top-k and top-p.

    `logits` is [B, V]; `temperature`/`top_p` are float [B], `top_k` int [B] (0 = off).
    Rows with temperature 0 are treated as temperature 1 here; the caller takes argmax for them.
    Filtered-out tokens get -inf. Rows are decided among their `_WINDOW` (or largest top_k) most likely
    tokens when their top-k or their nucleus closes there, the others by a full sort: both give the
    same filter (top-k first, then the smallest prefix whose mass reaches top_p).
    """
    logits = logits.float()
    temp = torch.where(temperature > 0, temperature, torch.ones_like(temperature))
    scaled = logits / temp.unsqueeze(1)
    vocab = scaled.shape[1]
    k = torch.where(top_k > 0, top_k, torch.full_like(top_k, vocab)).clamp(max=vocab)
    has_k, has_p = k < vocab, top_p < 1.0
    plain = ~(has_k | has_p)
    if bool(plain.all()):
        return torch.log_softmax(scaled, dim=-1)
    window = max(_WINDOW, int(k[has_k].max()) if bool(has_k.any()) else 0)
    if window * 4 > vocab:
        return _sorted_filter(scaled, k, top_p)
    vals, order = torch.topk(scaled, window, dim=-1)  # descending
    drop = torch.arange(window).unsqueeze(0) >= k.clamp(max=window).unsqueeze(1)
    # Each candidate's mass: renormalised over the top k where top-k applies (all of them are in the
    # window), else its share of the whole row.
    in_k = torch.softmax(vals.masked_fill(drop, float("-inf")), dim=-1)
    of_row = torch.exp(vals - torch.logsumexp(scaled, dim=-1, keepdim=True))
    probs = torch.where(has_k.unsqueeze(1), in_k, of_row)
    mass = torch.cumsum(probs, dim=-1)
    # Past the window every token's mass-before is at least the window's mass: dropped when that reaches top_p.
    beyond = has_p & ~has_k & (mass[:, -1] < top_p)
    if bool((beyond | plain).all()):  # flat distributions: no row closes in the window
        return _sorted_filter(scaled, k, top_p)
    drop |= ((mass - probs) >= top_p.unsqueeze(1)) & has_p.unsqueeze(1)
    drop[:, 0] = False
    out = torch.log_softmax(torch.full_like(scaled, float("-inf")).scatter(
        1, order, vals.masked_fill(drop, float("-inf"))), dim=-1)
    if bool(plain.any()):
        out[plain] = torch.log_softmax(scaled[plain], dim=-1)
    if bool(beyond.any()):
        out[beyond] = _sorted_filter(scaled[beyond], k[beyond], top_p[beyond])
    return out


def _sorted_filter(scaled: torch.Tensor, k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """`sampling_log_probs` by sorting every row (`k` = vocab where top-k is off)."""
    vocab = scaled.shape[1]
    sorted_logits, order = torch.sort(scaled, dim=-1, descending=True)
    drop = torch.arange(vocab).unsqueeze(0) >= k.unsqueeze(1)
    if bool((top_p < 1.0).any()):
        # Nucleus over what top-k left: keep the smallest prefix whose mass reaches top_p
        # (a token is dropped when the mass strictly before it already reaches top_p).
        probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs
        # Only rows that ask for it: a cumulative sum can round up to 1.0, which would cut the tail of
        # a top_p = 1 row sharing the batch with a top_p < 1 row.
        drop |= (mass_before >= top_p.unsqueeze(1)) & (top_p < 1.0).unsqueeze(1)
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
    vocab = logits.shape[1]
    plain = all(t == 1.0 for t in temperature) and all(k <= 0 or k >= vocab for k in top_k) and all(
        p >= 1.0 for p in top_p)
    # The model's own distribution, as probabilities (one vectorised softmax; no full log-softmax, and no
    # `exp`, which this torch runs through MKL's VML at ~1 ns a value on non-Intel CPUs).
    probs = torch.softmax(logits, dim=-1)
    if plain:
        samp = None  # plain sampling (the common RL setting): the sampled distribution is the model's
        samp_probs = probs
    else:
        samp = sampling_log_probs(logits, temp_t, torch.tensor(top_k, dtype=torch.int64),
                                  torch.tensor(top_p, dtype=torch.float32))
        samp_probs = torch.softmax(samp, dim=-1)  # exp(samp): its rows already sum to 1
    # Inverse-CDF sampling: one uniform per row (from the row's own generator when seeded), located in
    # the row's cumulative distribution. Filtered-out tokens have zero mass, so they are never drawn.
    uniform = torch.empty(len(generators))
    shared = [i for i, g in enumerate(generators) if g is None]
    if shared:
        uniform[shared] = torch.rand(len(shared), generator=default_generator)
    seeded = [i for i, g in enumerate(generators) if g is not None]
    if seeded:  # one draw per seeded row from its own generator, written back in one op
        uniform[seeded] = torch.cat([torch.rand(1, generator=generators[i]) for i in seeded])
    tokens = inverse_cdf(samp_probs, uniform)
    rows = torch.arange(logits.shape[0])
    greedy = any(t <= 0 for t in temperature)
    if greedy:
        tokens = torch.where(temp_t <= 0, torch.argmax(logits, dim=-1), tokens)
    # log of a drawn token's probability: never zero (zero-mass tokens are not drawn; argmax has the most).
    logprobs = torch.log(probs[rows, tokens])
    samp_lp = logprobs if samp is None else samp[rows, tokens]
    if greedy:
        samp_lp = torch.where(temp_t <= 0, torch.zeros(len(rows)), samp_lp)
    return SampleResult(tokens=tokens, logprobs=logprobs, sampling_logprobs=samp_lp, logits=logits)


def inverse_cdf(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Per row of `probs` [B, V] (rows summing to ~1), the first token whose cumulative mass exceeds
    `uniform` [B] times the row's total mass; tokens of zero mass are never returned.

    Two levels: the block whose cumulative mass passes the target, then the token inside it, so only
    [B, V / 64] and [B, 64] are scanned. The blocks' sums and a block's own running sum round
    differently from one long cumulative sum, so a target within rounding of a block's edge can land on
    a zero-mass token; such rows (or any past the end) are drawn again by the one-level scan.
    """
    rows, vocab = probs.shape
    blocks = -(-vocab // _CDF_BLOCK)
    pad = blocks * _CDF_BLOCK - vocab
    tiles = (torch.nn.functional.pad(probs, (0, pad)) if pad else probs).view(rows, blocks, _CDF_BLOCK)
    block_cdf = tiles.sum(dim=-1).cumsum(dim=-1)
    total = block_cdf[:, -1]
    if not bool(torch.isfinite(total).all()):  # NaN/inf logits (e.g. broken weights): fail the step, not draw
        raise ValueError(f"cannot sample: rows {torch.nonzero(~torch.isfinite(total)).flatten().tolist()} "
                         "have non-finite probabilities (NaN or inf logits)")
    # Strictly below the total, so the first entry above it always has positive mass.
    target = torch.minimum(uniform * total, torch.nextafter(total, torch.zeros_like(total)))
    which = torch.searchsorted(block_cdf, target.unsqueeze(1), right=True).squeeze(1).clamp_(max=blocks - 1)
    index = torch.arange(rows)
    before = torch.where(which > 0, block_cdf[index, (which - 1).clamp(min=0)], torch.zeros_like(total))
    inside = tiles[index, which].cumsum(dim=-1)
    offset = torch.searchsorted(inside, (target - before).unsqueeze(1), right=True).squeeze(1)
    tokens = which * _CDF_BLOCK + offset.clamp_(max=_CDF_BLOCK - 1)
    tokens.clamp_(max=vocab - 1)
    bad = probs[index, tokens] <= 0
    if bool(bad.any()):
        cdf = probs[bad].cumsum(dim=-1)
        last = cdf[:, -1]
        again = torch.minimum(uniform[bad] * last, torch.nextafter(last, torch.zeros_like(last)))
        tokens[bad] = torch.searchsorted(cdf, again.unsqueeze(1), right=True).squeeze(1)
    return tokens
