"""Split a prepared batch across ranks and merge the ranks' loss metrics back into one answer."""

from __future__ import annotations

import torch

from firetitan.server.trainer.batch import PreparedBatch


def split_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Datums [start, end) of `rank`: contiguous, sizes differing by at most one, in order."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def split_batch(batch: PreparedBatch, rank: int, world_size: int) -> PreparedBatch | None:
    """This rank's datums as their own batch (padding trimmed to their longest), None when it has none."""
    start, end = split_bounds(len(batch.lengths), rank, world_size)
    if start == end:
        return None
    lengths = batch.lengths[start:end]
    width = max(lengths)
    mask = None
    if batch.attention_mask is not None and min(lengths) < width:
        mask = batch.attention_mask[start:end, :width]
    return PreparedBatch(input_ids=batch.input_ids[start:end, :width], attention_mask=mask, lengths=lengths,
                         targets=batch.targets[start:end], inputs=batch.inputs[start:end],
                         loss_fn=batch.loss_fn, loss_fn_config=batch.loss_fn_config)


def merge_metrics(parts: list[tuple[dict[str, float], int]]) -> dict[str, float]:
    """Combine per-rank metrics by their reduction suffix: `:sum` adds, `:min`/`:max` take the
    extreme, anything else (`:mean`) is averaged weighted by each rank's token count."""
    merged: dict[str, float] = {}
    keys = {k for metrics, _ in parts for k in metrics}
    for key in sorted(keys):
        present = [(m[key], n) for m, n in parts if key in m]
        values = torch.tensor([v for v, _ in present], dtype=torch.float64)
        if key.endswith(":sum"):
            merged[key] = float(values.sum())
        elif key.endswith(":min"):
            merged[key] = float(values.min())
        elif key.endswith(":max"):
            merged[key] = float(values.max())
        else:
            weights = torch.tensor([float(n) for _, n in present], dtype=torch.float64)
            total = float(weights.sum())
            merged[key] = float((values * weights).sum()) / total if total else float(values.mean())
    return merged


