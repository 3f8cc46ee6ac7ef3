"""Batch-shaped weights for the batch sizes decoding keeps running at (MKL packs; float32 on the CPU).

A pack serves exactly one batch size (`ops.BatchPackedWeights`), so packing every size seen would
cost a copy of the weights per size. Under a steady load the decode batch sits at one size for many
steps (a fixed concurrency, the running-sequence limit, a fan-out of equal requests); under a churning
one it moves every few steps and no pack would pay for itself. So a size is packed only once it has
run `settle` decode steps in a row, and at most `max_packs` packs are held, least recently used
dropped first. A size whose pack lost to the other paths (`path_choice`) is declined and never packed
again. Bounded: memory `max_packs` x (projections + lm_head); `declined` holds at most one entry per
batch size (the number of KV slots).
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from firetitan.server.deployment.engine.ops import BatchPackedWeights


class BatchPacks:
    def __init__(self, model: torch.nn.Module, layers: list[torch.nn.Module], max_packs: int = 1,
                 settle: int = 8) -> None:
        if max_packs < 1 or settle < 1:
            raise ValueError("max_packs and settle must be at least 1")
        self.model = model
        self.layers = layers
        self.max_packs = max_packs
        self.settle = settle
        self.packs: OrderedDict[int, BatchPackedWeights] = OrderedDict()  # batch size -> pack, LRU first
        self.declined: set[int] = set()
        self.built = 0  # packs made so far (read by tests and benchmarks)
        self._batch = 0
        self._streak = 0

    def observe(self, batch: int) -> None:
        """Count a decode step of `batch` sequences; pack that size once it has settled."""
        self._streak = self._streak + 1 if batch == self._batch else 1
        self._batch = batch
        if self._streak >= self.settle and batch not in self.packs and batch not in self.declined:
            while len(self.packs) >= self.max_packs:
                self.packs.popitem(last=False)  # drop before building: the peak stays max_packs copies
            self.packs[batch] = BatchPackedWeights.for_rows(self.model, self.layers, batch)
            self.built += 1

    def get(self, batch: int) -> BatchPackedWeights | None:
        """The pack for exactly `batch` rows, current with the model's weights, or None."""
        pack = self.packs.get(batch)
        if pack is not None:
            self.packs.move_to_end(batch)
            pack.refresh()  # a hot-load wrote the modules' weights: repack (what a swap costs once)
        return pack

    def decline(self, batch: int) -> None:
        """`batch`'s pack was not the fastest path: free it and never pack that size again."""
        self.packs.pop(batch, None)
        self.declined.add(batch)
