"""Baseline: the hosted Fireworks SDK's AdaptiveConcurrencyController rule, rebuilt from its documented behaviour.

Source: shared/reference/fireworks_api.md §3.5 (1.2.30 defaults). Every `adjustment_interval`
releases (and at `step_completed()`), if the interval saw prefill-queue samples:
`ema = mean` on first use else `0.3*mean + 0.7*ema`; over target → window × 0.5; otherwise
window + 1.0 × min(target / max(ema, 0.001), 4.0); clamp; the gate admits `int(window)`.
No slow start, no saturation check, EMA of means. Only the benchmark uses it.
"""

from __future__ import annotations

import time
from typing import Any

from firetitan.client.concurrency import _GatedController
from firetitan.client.server_metrics import ServerMetrics


def hosted_next_window(window: float, ema: float | None, samples: list[float], *, target: float = 0.5,
                       additive_increase: float = 1.0, multiplicative_decrease: float = 0.5,
                       ema_alpha: float = 0.3, min_window: float = 1.0, max_window: float = 256.0,
                       max_increase_factor: float = 4.0, pq_floor: float = 0.001) -> tuple[float, float | None]:
    """One hosted-rule adjustment: returns (window, ema)."""
    if not samples:
        return window, ema
    avg = sum(samples) / len(samples)
    ema = avg if ema is None else ema_alpha * avg + (1 - ema_alpha) * ema
    if ema > target:
        window = window * multiplicative_decrease
    else:
        window = window + additive_increase * min(target / max(ema, pq_floor), max_increase_factor)
    return min(max_window, max(min_window, window)), ema


class HostedAIMDController(_GatedController):
    """The hosted rule on firetitan's loop-safe gate (the 1.2.30 gate also keeps shrink debt)."""

    def __init__(self, initial_window: int = 8, min_window: int = 1, max_window: int = 256,
                 prefill_queue_target: float = 0.5, adjustment_interval: int = 32) -> None:
        self.min_window, self.max_window = float(min_window), float(max_window)
        self.target = prefill_queue_target
        self.adjustment_interval = adjustment_interval
        self._window = float(min(max_window, max(min_window, initial_window)))
        self._ema: float | None = None
        self._samples: list[float] = []
        self._releases = 0
        self.history: list[dict[str, Any]] = []
        super().__init__(int(self._window))

    def _on_release_locked(self, metrics: ServerMetrics | None, weight: int) -> None:
        self._releases += weight
        if metrics is not None and metrics.prefill_queue_duration is not None:
            self._samples.append(metrics.prefill_queue_duration)
        if self.adjustment_interval and self._releases >= self.adjustment_interval:
            self._adjust_locked("interval")

    def _adjust_locked(self, trigger: str) -> bool:
        self._releases = 0
        if not self._samples:
            return False
        before = self._window
        self._window, self._ema = hosted_next_window(self._window, self._ema, self._samples, target=self.target,
                                                     min_window=self.min_window, max_window=self.max_window)
        self._samples = []
        self.history.append({"t": time.monotonic(), "trigger": trigger, "before": before, "after": self._window,
                             "signal": self._ema})
        self._set_window_locked(int(self._window))
        return True

    def step_completed(self) -> dict[str, float]:
        with self._gate.lock:
            out = self._step_summary_locked()
            if self._adjust_locked("step"):
                out["window_after"] = float(self._gate.window)
            if self._ema is not None:
                out["ema_pq"] = self._ema
            self._reset_step_locked()
        return out

    def __repr__(self) -> str:
        return f"HostedAIMDController(window={self.window_size}, target={self.target})"
