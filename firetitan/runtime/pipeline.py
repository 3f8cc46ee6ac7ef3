"""Trainer pipeline: submit forward_backward*/optim_step ahead, await later, keep at most k steps in flight.

Submissions are ordered on the trainer by its per-model `seq_id`, so step t+1 can be queued while step
t still runs and the trainer never waits on a client round-trip between steps.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from firetitan.client.custom_loss import CustomLossFn
from firetitan.runtime.protocols import TrainingClientLike
from firetitan.runtime.remote import DEFAULT_TIMEOUT_S, call
from firetitan.runtime.run_metrics import BusyTracker


@dataclass
class StepResult:
    step: int
    forward_backward: Any
    optim: Any
    latency_s: float
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def metrics(self) -> dict[str, float]:
        out = dict(getattr(self.forward_backward, "metrics", None) or {})
        out.update({f"optim/{k}": v for k, v in (getattr(self.optim, "metrics", None) or {}).items()})
        return out


@dataclass
class _InFlight:
    step: int
    fb: Any
    optim: Any
    submitted_at: float
    meta: dict[str, Any]
    tracked: bool = False
    untrack: Callable[..., None] | None = None


class TrainerPipeline:
    """Keeps up to `max_in_flight` (forward_backward, optim_step) pairs queued on the trainer.

    `submit` returns the results of steps that had to be awaited to make room (oldest first);
    `drain` awaits the rest. Every await is bounded by `timeout_s` and raises `APITimeoutError`.
    """

    def __init__(self, client: TrainingClientLike, *, max_in_flight: int = 2, timeout_s: float = DEFAULT_TIMEOUT_S,
                 busy: BusyTracker | None = None) -> None:
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight: must be >= 1, got {max_in_flight}")
        self.client = client
        self.max_in_flight = max_in_flight
        self.timeout_s = timeout_s
        self.busy = busy or BusyTracker()
        self._queue: deque[_InFlight] = deque()

    @property
    def in_flight(self) -> int:
        return len(self._queue)

    async def submit(self, step: int, data: Sequence[Any], adam_params: Any, *, loss_fn: str = "cross_entropy",
                     loss_fn_config: dict[str, Any] | None = None,
                     custom_loss: CustomLossFn | None = None,
                     meta: dict[str, Any] | None = None) -> list[StepResult]:
        done: list[StepResult] = []
        while len(self._queue) >= self.max_in_flight:
            done.append(await self._await_oldest())
        if custom_loss is not None:
            fb = self.client.forward_backward_custom(list(data), custom_loss)
        else:
            fb = self.client.forward_backward(list(data), loss_fn, loss_fn_config)
        optim = self.client.optim_step(adam_params)
        item = _InFlight(step, fb, optim, time.monotonic(), dict(meta or {}))
        self._track(item)
        self._queue.append(item)
        return done

    def _track(self, item: _InFlight) -> None:
        """The trainer counts as busy from submission until the step's optim_step finishes on it.

        A done-callback ends the busy span when the trainer finishes, not when we get round to
        awaiting it, so the idle ratio measures the trainer and not this loop.
        """
        self.busy.enter()
        lock = threading.Lock()

        def finish(*_: Any) -> None:
            with lock:
                if not item.tracked:
                    return
                item.tracked = False
            self.busy.exit()

        item.tracked = True
        item.untrack = finish
        add = getattr(item.optim, "add_done_callback", None)
        if callable(add):
            add(finish)

    async def _await_oldest(self) -> StepResult:
        item = self._queue[0]
        try:
            fb = await call(item.fb, timeout=self.timeout_s, what=f"forward_backward of step {item.step}")
            optim = await call(item.optim, timeout=self.timeout_s, what=f"optim_step of step {item.step}")
        finally:
            self._queue.popleft()
            if item.untrack:
                item.untrack()
        return StepResult(item.step, fb, optim, time.monotonic() - item.submitted_at, item.meta)

    async def drain(self) -> list[StepResult]:
        done = []
        while self._queue:
            done.append(await self._await_oldest())
        return done

    def abandon(self) -> None:
        """Cancel what is still queued (on error or cancellation): nothing is left holding a future."""
        while self._queue:
            item = self._queue.popleft()
            if item.untrack:
                item.untrack()
            for fut in (item.fb, item.optim):
                cancel = getattr(fut, "cancel", None)
                if callable(cancel):
                    cancel()
