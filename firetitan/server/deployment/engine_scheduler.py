"""Scheduler: decides which requests are admitted, prefilled and decoded each step; computes nothing."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from firetitan.server.deployment.request import EngineRequest, RequestState


@dataclass
class ScheduleDecision:
    """One iteration: prefill `admitted` (they join the batch), then decode every running request."""

    admitted: list[EngineRequest] = field(default_factory=list)
    decode: list[EngineRequest] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.admitted and not self.decode


class Scheduler:
    """FIFO admission under a running-sequence limit and a cached-token budget.

    Admission reserves each request's worst case (prompt + max_tokens), so a running request never
    needs to be preempted for cache space. `admitting = False` holds the queue (SYNC hot-load drain).
    """

    def __init__(self, max_running_seqs: int, max_cached_tokens: int, max_prefill_tokens: int = 4096) -> None:
        self.max_running_seqs = max_running_seqs
        self.max_cached_tokens = max_cached_tokens
        self.max_prefill_tokens = max_prefill_tokens
        self.waiting: deque[EngineRequest] = deque()
        self.running: list[EngineRequest] = []  # in KV slot order
        self.reserved_tokens = 0
        self.admitting = True

    @property
    def num_requests(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, request: EngineRequest) -> None:
        self.waiting.append(request)

    def schedule(self) -> ScheduleDecision:
        """Pick this step's work; admitted requests move to RUNNING (their prefill starts now)."""
        decision = ScheduleDecision(decode=list(self.running))
        prefill_tokens = 0
        while self.admitting and self.waiting:
            head = self.waiting[0]
            if len(self.running) + len(decision.admitted) >= self.max_running_seqs:
                break
            if self.reserved_tokens + head.reserved_tokens > self.max_cached_tokens:
                break
            # Bound one step's prefill so a burst of long prompts cannot stall every decode for long;
            # the first admission always goes through so a long prompt cannot starve.
            if decision.admitted and prefill_tokens + len(head.prompt) > self.max_prefill_tokens:
                break
            self.waiting.popleft()
            head.advance(RequestState.RUNNING)
            head.prefill_start = time.monotonic()
            self.reserved_tokens += head.reserved_tokens
            prefill_tokens += len(head.prompt)
            decision.admitted.append(head)
        return decision

    def start_running(self, requests: list[EngineRequest]) -> None:
        """Record prefilled requests as members of the decode batch (their slots follow the others)."""
        self.running.extend(requests)

    def finish(self, request: EngineRequest, state: RequestState, reason: str) -> None:
        """Take a request out (running or waiting) and release its reservation."""
        if request.state is RequestState.RUNNING:
            self.reserved_tokens -= request.reserved_tokens
            if request in self.running:  # absent only when its prefill step failed
                self.running.remove(request)
        elif request.state is RequestState.WAITING:
            self.waiting.remove(request)
        request.finish_reason = reason
        request.finished_at = time.monotonic()
        request.advance(state)
