"""Pick the faster of the decode step's two matmul paths, per batch size, by timing real steps.

The runner can run a decode step's projections two ways that differ only by float rounding: through
its prepared weights (fused q/k/v and gate/up, prepacked for oneDNN) or through the model's own
modules (plain BLAS). Which one is faster depends on the model, the batch and the machine, and not
in a way a rule captures. Measured on this 2-core CPU (float32, ms per step, prepared / modules):
SmolLM2-135M 38.4 / 31.7 at batch 1 and 40.9 / 35.0 at batch 3 (BLAS's matrix-vector kernels stream
the weights faster), but 43 / 50 at batch 4 and 133 / 151 at batch 64; tiny-qwen3 1.4 / 1.0 at batch 1
and 3.9 / 3.6 at batch 64 (oneDNN's per-call cost dominates small matrices); bfloat16 SmolLM2
27 / 37 at batch 1 (the prepared weights win).

So the first steps of each batch-size bucket (1, 2-3, 4-7, ...) alternate between the paths, and
once each has `trials` timings the faster minimum wins for that bucket for good. Bounded: one entry
per bucket (at most 64 buckets), `trials` floats per path each.
"""

from __future__ import annotations

PREPARED = "prepared"
MODULES = "modules"


class DecodePathChooser:
    def __init__(self, trials: int = 3) -> None:
        if trials < 1:
            raise ValueError("trials must be at least 1")
        self.trials = trials
        self._timings: dict[int, dict[str, list[float]]] = {}
        self.chosen: dict[int, str] = {}  # bucket -> path, once decided (read by tests and benchmarks)

    def _trials_of(self, bucket: int) -> dict[str, list[float]]:
        return self._timings.setdefault(bucket, {PREPARED: [], MODULES: []})

    @staticmethod
    def bucket(batch: int) -> int:
        """1 for batch 1, 2 for 2-3, 3 for 4-7, ...: powers of two share a kernel regime."""
        return max(1, batch).bit_length()

    def pick(self, batch: int) -> str:
        bucket = self.bucket(batch)
        decided = self.chosen.get(bucket)
        if decided is not None:
            return decided
        timings = self._trials_of(bucket)
        # The path with fewer timings goes next, prepared first: alternating spreads any noise over both.
        return PREPARED if len(timings[PREPARED]) <= len(timings[MODULES]) else MODULES

    def record(self, batch: int, path: str, seconds: float) -> None:
        bucket = self.bucket(batch)
        if bucket in self.chosen:
            return
        timings = self._trials_of(bucket)
        timings[path].append(seconds)
        if all(len(t) >= self.trials for t in timings.values()):
            # Minimum, not mean: a step slowed by another process or a cache grow is not the kernel's speed.
            self.chosen[bucket] = min(timings, key=lambda p: min(timings[p]))
            del self._timings[bucket]
