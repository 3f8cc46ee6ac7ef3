"""Pick the fastest of the decode step's (and prefill's) matmul paths, per batch size, by timing real steps.

The runner can run a decode step's projections several ways that differ only by float rounding:
through its prepared weights (fused q/k/v and gate/up, prepacked for oneDNN), through the model's own
modules (plain BLAS), for a batch size that keeps recurring through weights MKL packed for exactly
that many rows (`batch_packs`), and through the native matmul's row-blocked weights
(`ops.RowBlockedWeights`). A prefill picks between the prepared and the row-blocked weights the same
way, keyed by the bucket of its token rows and timed per row. Which one is faster depends on the model, the batch and the
machine, and not in a way a rule captures. Measured on a 2-core CPU (float32, ms per step, prepared /
modules): SmolLM2-135M 38.4 / 31.7 at batch 1 and 40.9 / 35.0 at batch 3 (BLAS's matrix-vector
kernels stream the weights faster), but 43 / 50 at batch 4 and 133 / 151 at batch 64; tiny-qwen3
1.4 / 1.0 at batch 1 and 3.9 / 3.6 at batch 64 (oneDNN's per-call cost dominates small matrices);
bfloat16 SmolLM2 27 / 37 at batch 1 (the prepared weights win). On another 2-core CPU, SmolLM2's
batch-64 step took 117 ms through a 64-row MKL pack against 138-156 ms for either other path.

So the first steps under a key (a batch-size bucket 1, 2-3, 4-7, ...; or one exact batch size once it
has a pack) alternate between that key's candidate paths, and once each has `trials` timings the
faster minimum wins for that key for good. Bounded: one entry per bucket (at most 64) and per packed
batch size (at most the number of KV slots), `trials` floats per path each.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

PREPARED = "prepared"
MODULES = "modules"
PACKED = "packed"
ROW_BLOCKED = "row_blocked"


class DecodePathChooser:
    def __init__(self, trials: int = 3) -> None:
        if trials < 1:
            raise ValueError("trials must be at least 1")
        self.trials = trials
        self._timings: dict[Hashable, dict[str, list[float]]] = {}
        self.chosen: dict[Hashable, str] = {}  # key -> path, once decided (read by tests and benchmarks)

    @staticmethod
    def bucket(batch: int) -> tuple[str, int]:
        """The key of a batch size's bucket: 1, 2-3, 4-7, ... (powers of two share a kernel regime)."""
        return ("bucket", max(1, batch).bit_length())

    @staticmethod
    def exact(batch: int) -> tuple[str, int]:
        """The key of one batch size (used once that size has its own packed weights)."""
        return ("batch", batch)

    def pick(self, key: Hashable, paths: Sequence[str]) -> str:
        """The decided path for `key`, else the candidate with the fewest timings (earliest listed on a tie):
        alternating spreads any noise over all of them."""
        decided = self.chosen.get(key)
        if decided is not None:
            return decided
        timings = self._timings.setdefault(key, {path: [] for path in paths})
        return min(timings, key=lambda p: len(timings[p]))

    def record(self, key: Hashable, path: str, seconds: float) -> str | None:
        """Add a timing; returns the path chosen for `key` when this timing decided it."""
        timings = self._timings.get(key)
        if key in self.chosen or timings is None:
            return None
        timings[path].append(seconds)
        if any(len(t) < self.trials for t in timings.values()):
            return None
        # Minimum, not mean: a step slowed by another process or a cache grow is not the kernel's speed.
        chosen = min(timings, key=lambda p: min(timings[p]))
        self.chosen[key] = chosen
        del self._timings[key]
        return chosen
