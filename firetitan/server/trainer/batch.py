"""Validate a list of datums for one loss and pack them into padded tensors for a single forward pass."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from firetitan.errors import InvalidRequestError
from firetitan.losses import check_inputs, get_loss, resolve_config
from firetitan.types import Datum


@dataclass
class PreparedBatch:
    """Right-padded inputs plus per-datum targets and loss inputs (already validated)."""

    input_ids: torch.Tensor  # [B, T] int64
    attention_mask: torch.Tensor | None  # None when no datum is padded
    lengths: list[int]
    targets: list[torch.Tensor]  # [N] or [N, K] int64, N = lengths[i]
    inputs: list[dict[str, torch.Tensor]]  # float32, shaped like targets
    loss_fn: str
    loss_fn_config: dict[str, float]

    @property
    def num_tokens(self) -> int:
        return sum(self.lengths)

    def to(self, device: torch.device | str) -> PreparedBatch:
        """The same batch with every tensor on `device` (itself when they already are)."""
        if self.input_ids.device == torch.device(device):
            return self
        mask = None if self.attention_mask is None else self.attention_mask.to(device)
        return PreparedBatch(self.input_ids.to(device), mask, self.lengths, [t.to(device) for t in self.targets],
                             [{k: v.to(device) for k, v in inp.items()} for inp in self.inputs],
                             self.loss_fn, self.loss_fn_config)


def _check_ids(ids: torch.Tensor, vocab_size: int, field: str) -> None:
    if ids.numel() == 0:
        return
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        raise InvalidRequestError(
            f"{field}: token id {bad} is outside the vocabulary [0, {vocab_size})", field=field
        )


def prepare_batch(data: Sequence[Datum], loss_fn: str, loss_fn_config: dict[str, float | str] | None,
                  vocab_size: int, pad_id: int = 0) -> PreparedBatch:
    """Check every datum against `loss_fn` and the vocabulary; raise InvalidRequestError naming the field."""
    get_loss(loss_fn)
    config = resolve_config(loss_fn, loss_fn_config)
    rows: list[list[int]] = []
    targets: list[torch.Tensor] = []
    inputs: list[dict[str, torch.Tensor]] = []
    for i, datum in enumerate(data):
        where = f"data[{i}]"
        tokens = datum.model_input.to_ints()
        n = len(tokens)
        if n == 0:
            raise InvalidRequestError(f"{where}.model_input: has no tokens", field=f"{where}.model_input")
        ids = torch.tensor(tokens, dtype=torch.int64)
        _check_ids(ids, vocab_size, f"{where}.model_input")
        check_inputs(loss_fn, set(datum.loss_fn_inputs), where=f"{where}.loss_fn_inputs")
        tt_field = f"{where}.loss_fn_inputs.target_tokens"
        tt = datum.loss_fn_inputs["target_tokens"]
        target = tt.to_torch()
        if target.dtype.is_floating_point:
            if not torch.equal(target, target.round()):
                raise InvalidRequestError(f"{tt_field}: token ids must be integers", field=tt_field)
        target = target.to(torch.int64)
        if target.dim() not in (1, 2) or target.shape[0] != n:
            raise InvalidRequestError(
                f"{tt_field}: shape {list(target.shape)} does not match model_input length {n} "
                f"(expected [{n}] or [{n}, K])",
                field=tt_field,
            )
        _check_ids(target, vocab_size, tt_field)
        extra: dict[str, torch.Tensor] = {}
        for key, td in datum.loss_fn_inputs.items():
            if key == "target_tokens":
                continue
            value = td.to_torch().to(torch.float32)
            if value.shape != target.shape:
                field = f"{where}.loss_fn_inputs.{key}"
                raise InvalidRequestError(
                    f"{field}: shape {list(value.shape)} differs from target_tokens {list(target.shape)}",
                    field=field,
                )
            if not torch.isfinite(value).all():
                field = f"{where}.loss_fn_inputs.{key}"
                raise InvalidRequestError(f"{field}: contains NaN or infinity", field=field)
            extra[key] = value
        rows.append(tokens)
        targets.append(target)
        inputs.append(extra)
    lengths = [len(r) for r in rows]
    width = max(lengths, default=0)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.int64)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.int64)
    mask = None
    if any(n != width for n in lengths):
        mask = torch.zeros((len(rows), width), dtype=torch.int64)
        for i, n in enumerate(lengths):
            mask[i, :n] = 1
    return PreparedBatch(input_ids, mask, lengths, targets, inputs, loss_fn, config)


def gather_logprobs(logits: torch.Tensor, batch: PreparedBatch) -> list[torch.Tensor]:
    """Per datum, the untempered log-probability of each target token (shape of its targets).

    One log-softmax and one gather over the real (unpadded) positions of the whole batch: slicing the
    [B, T, V] logits per datum instead makes autograd write a full-size zero gradient for every slice,
    which made backward O(batch^2) in memory traffic (5x the forward at 32 rows of the nano model).
    """
    lengths = batch.lengths
    widths = [1 if t.dim() == 1 else int(t.shape[1]) for t in batch.targets]
    k = max(widths)
    positions = torch.zeros(logits.shape[:2], dtype=torch.bool, device=logits.device)
    for i, n in enumerate(lengths):
        positions[i, :n] = True
    logp = torch.log_softmax(logits[positions].float(), dim=-1)  # [sum(lengths), V]
    # Targets with fewer than k columns are padded with token 0; the padding is sliced off below.
    idx = torch.zeros((logp.shape[0], k), dtype=torch.int64, device=logits.device)
    start = 0
    for n, w, target in zip(lengths, widths, batch.targets, strict=True):
        idx[start:start + n, :w] = target.view(n, w)
        start += n
    gathered = logp.gather(-1, idx)  # [sum(lengths), k]
    out: list[torch.Tensor] = []
    for chunk, w, target in zip(gathered.split(lengths), widths, batch.targets, strict=True):
        out.append(chunk[:, :w].reshape(target.shape))
    return out
