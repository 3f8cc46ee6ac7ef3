"""Slot-based contiguous KV cache: one row per running sequence, kept compact so a decode batch is a view."""

from __future__ import annotations

import torch


class SlotKVCache:
    """Keys and values for up to `num_slots` sequences, each up to `capacity` positions.

    Per layer the tensors are [num_slots + 1, kv_heads, capacity, head_dim]: the extra row `staging` holds
    the one prompt being prefilled in chunks until it is whole and moves to a live slot. Live sequences always occupy
    slots 0..active-1: freeing a slot moves the last live sequence into the hole, so the decode batch
    is `k[:active]` with no gather. Capacity grows by doubling on demand (never past `max_capacity`) and
    shrinks again once the long sequences have left, so memory is at most `bound_bytes` and, at rest,
    follows the longest live sequence. Its tensors are inference tensors (the runner computes under
    `torch.inference_mode`), so every method that writes them runs in that mode too.
    """

    def __init__(self, num_layers: int, num_slots: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                 max_capacity: int, initial_capacity: int = 256, device: torch.device | str = "cpu") -> None:
        self.num_layers = num_layers
        self.num_slots = num_slots
        self.kv_heads = kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = torch.device(device)
        self.max_capacity = max_capacity
        self.capacity = 0
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.staging = num_slots  # row of the prompt being prefilled in chunks
        self.lengths: list[int] = [0] * (num_slots + 1)
        self.active = 0
        self._initial = min(initial_capacity, max_capacity)

    @property
    def bytes_per_position(self) -> int:
        """Keys + values of one position in one row, over all layers."""
        return 2 * self.num_layers * self.kv_heads * self.head_dim * torch.empty(0, dtype=self.dtype).element_size()

    @property
    def bound_bytes(self) -> int:
        """The most this cache ever holds: every row (slots + staging) at `max_capacity`."""
        return (self.num_slots + 1) * self.max_capacity * self.bytes_per_position

    @property
    def allocated_bytes(self) -> int:
        return (self.num_slots + 1) * self.capacity * self.bytes_per_position if self.k else 0

    def shrink(self) -> None:
        """Give memory back when every live sequence fits in a quarter of the capacity (hysteresis)."""
        longest = max(max(self.lengths[: self.active], default=0), self.lengths[self.staging]) + 1
        if self.capacity <= self._initial or longest * 4 > self.capacity:
            return
        new_cap = max(self._initial, 1 << (2 * longest - 1).bit_length())
        self._reallocate(min(new_cap, self.max_capacity), keep=longest)

    @property
    def used_tokens(self) -> int:
        """Positions written for live sequences (what /metrics reports as cached tokens)."""
        return sum(self.lengths[: self.active])

    def ensure_capacity(self, positions: int) -> None:
        """Make room for `positions` per slot, keeping what is stored."""
        if positions <= self.capacity:
            return
        if positions > self.max_capacity:
            raise ValueError(f"sequence of {positions} positions exceeds the cache limit {self.max_capacity}")
        new_cap = max(self._initial, self.capacity or 1)
        while new_cap < positions:
            new_cap *= 2
        self._reallocate(min(new_cap, self.max_capacity), keep=self.capacity)

    @torch.inference_mode()
    def _reallocate(self, new_cap: int, keep: int) -> None:
        """New storage of `new_cap` positions per row, keeping the first `keep` of every live row.

        Layer by layer (allocate the new, copy, drop the old), so a resize holds at most one layer twice.
        """
        shape = (self.num_slots + 1, self.kv_heads, new_cap, self.head_dim)
        keep = min(keep, self.capacity, new_cap)
        rows = [*range(self.active), self.staging] if self.lengths[self.staging] else list(range(self.active))
        new_k: list[torch.Tensor] = []
        new_v: list[torch.Tensor] = []
        for layer in range(self.num_layers):
            k = torch.zeros(shape, dtype=self.dtype, device=self.device)
            v = torch.zeros(shape, dtype=self.dtype, device=self.device)
            if keep and rows:
                k[rows, :, :keep] = self.k[layer][rows, :, :keep]
                v[rows, :, :keep] = self.v[layer][rows, :, :keep]
            if self.k:
                self.k[layer] = self.v[layer] = torch.empty(0)
            new_k.append(k)
            new_v.append(v)
        self.k, self.v, self.capacity = new_k, new_v, new_cap

    def allocate(self, count: int) -> range:
        """Reserve `count` fresh slots at the end of the live range."""
        if self.active + count > self.num_slots:
            raise ValueError(f"no free KV slots: {self.active} live + {count} > {self.num_slots}")
        start = self.active
        self.active += count
        for slot in range(start, self.active):
            self.lengths[slot] = 0
        return range(start, self.active)

    @torch.inference_mode()
    def copy_prefix(self, src: int, dst: int, positions: int) -> None:
        """Give slot `dst` the first `positions` keys/values of slot `src` (an identical prompt)."""
        for layer in range(self.num_layers):
            self.k[layer][dst, :, :positions] = self.k[layer][src, :, :positions]
            self.v[layer][dst, :, :positions] = self.v[layer][src, :, :positions]
        self.lengths[dst] = positions

    @torch.inference_mode()
    def free(self, slot: int) -> int | None:
        """Release `slot`; returns the slot whose sequence moved into it (or None when it was last)."""
        last = self.active - 1
        moved: int | None = None
        if slot != last:
            for layer in range(self.num_layers):
                n = self.lengths[last]
                self.k[layer][slot, :, :n] = self.k[layer][last, :, :n]
                self.v[layer][slot, :, :n] = self.v[layer][last, :, :n]
            self.lengths[slot] = self.lengths[last]
            moved = last
        self.lengths[last] = 0
        self.active = last
        return moved

    def reset(self, keep_storage: bool = False) -> None:
        """Drop every sequence (used only when nothing is running), and the storage unless `keep_storage`
        and it is at the initial capacity.

        Keeping it spares the next burst a fresh zero-filled allocation (SmolLM2, 64 slots: 767 MB; the
        first prefill of a burst of 16 x 32-token prompts took 650 ms with it, 480-495 ms without). Its stale keys and values sit past every new
        sequence's length, where decode's mask gives them weight 0; they are finite because a step whose
        keys or values went non-finite fails (its logits do too), and a failed step drops the storage.
        """
        if not (keep_storage and self.capacity == self._initial):
            self.k, self.v, self.capacity = [], [], 0
        self.active = 0
        self.lengths = [0] * (self.num_slots + 1)
