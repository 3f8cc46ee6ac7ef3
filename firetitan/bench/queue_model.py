"""The simulation's queueing model of a continuous-batching server, clock-free (model seconds), and its config."""

from __future__ import annotations

import hashlib
import json
import random
from collections import OrderedDict, deque
from typing import TYPE_CHECKING, Any

import pydantic

if TYPE_CHECKING:
    from firetitan.server.deployment.engine import EngineRequest

PREFIX_CACHE_ENTRIES = 4096
# Reserve the top ids so simulated completions never contain "special" tokens.
_SPECIAL_TOKENS = 16


class FaultConfig(pydantic.BaseModel):
    """Injected failures, counted per `x-request-id` so a retried request sees them in order."""

    model_config = pydantic.ConfigDict(extra="forbid")

    fail_attempts: int = pydantic.Field(0, ge=0)
    fail_status: int = pydantic.Field(503, ge=400, le=599)
    retry_after_s: float | None = pydantic.Field(None, ge=0)
    truncate_attempts: int = pydantic.Field(0, ge=0)
    error_rate: float = pydantic.Field(0.0, ge=0, le=1)
    seed: int = 0


class SimConfig(pydantic.BaseModel):
    """The queueing model. Durations are in model seconds."""

    model_config = pydantic.ConfigDict(extra="forbid")

    capacity: int = pydantic.Field(128, ge=1, description="concurrent decode slots")
    decode_base_s: float = pydantic.Field(0.02, gt=0)
    decode_per_seq_s: float = pydantic.Field(0.0002, ge=0)
    prefill_per_token_s: float = pydantic.Field(0.00002, ge=0)
    time_scale: float = pydantic.Field(0.02, gt=0, description="wall seconds per model second")
    tick_tokens: int = pydantic.Field(4, ge=1, description="decode steps simulated per engine tick")
    stream_every: int = pydantic.Field(0, ge=0, description="emit a chunk every k tokens; 0 = first + rest")
    eos_prob: float = pydantic.Field(0.0, ge=0, lt=1, description="per-token chance of stopping early")
    vocab_size: int = pydantic.Field(4096, ge=32)
    max_context: int = pydantic.Field(32768, ge=8)
    policy_version: str = "simulated-base"
    faults: FaultConfig = pydantic.Field(default_factory=FaultConfig)


class SimRequest:
    __slots__ = ("admit_vt", "arrival_vt", "cached", "cancelled", "concurrent", "done_vt", "finish_reason",
                 "first_vt", "generated", "max_tokens", "owner", "prompt_len", "rng", "sent", "target_len")

    def __init__(self, prompt_len: int, cached: int, max_tokens: int, rng: random.Random, eos_prob: float,
                 arrival_vt: float) -> None:
        self.prompt_len = prompt_len
        self.cached = cached
        self.max_tokens = max_tokens
        self.rng = rng
        # Early stop drawn up front (geometric), so the engine only counts tokens.
        self.target_len = max_tokens
        if eos_prob > 0:
            length = 1
            while length < max_tokens and rng.random() >= eos_prob:
                length += 1
            self.target_len = length
        self.finish_reason = "length" if self.target_len >= max_tokens else "stop"
        self.arrival_vt = arrival_vt
        self.admit_vt: float | None = None
        self.first_vt: float | None = None
        self.done_vt: float | None = None
        self.generated = 0
        self.concurrent = 0
        self.cancelled = False
        self.owner: EngineRequest | None = None  # the route's request this one simulates
        self.sent = 0  # tokens already emitted


class QueueModel:
    """The queueing model itself, clock-free: `tick()` advances it by one engine iteration and says how
    long that took in model seconds. Used by the HTTP simulation and by the discrete-event benchmark."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.vt = 0.0  # model seconds
        self.waiting: deque[SimRequest] = deque()
        self.running: list[SimRequest] = []
        self.prefix_cache: OrderedDict[str, None] = OrderedDict()
        self.tokens_out = 0
        self.completed = 0
        self.busy_vt = 0.0

    def submit(self, prompt: list[int], max_tokens: int, seed: int) -> SimRequest:
        key = hashlib.blake2b(json.dumps(prompt[:-1]).encode(), digest_size=12).hexdigest()
        cached = 0
        if len(prompt) > 1 and key in self.prefix_cache:
            self.prefix_cache.move_to_end(key)
            cached = len(prompt) - 1
        else:
            self.prefix_cache[key] = None
            if len(self.prefix_cache) > PREFIX_CACHE_ENTRIES:
                self.prefix_cache.popitem(last=False)
        req = SimRequest(len(prompt), cached, max_tokens, random.Random(seed), self.config.eos_prob, self.vt)
        self.waiting.append(req)
        return req

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    def admit(self) -> int:
        """Move waiting requests into free slots; returns the prompt tokens to prefill."""
        cfg = self.config
        self.running = [r for r in self.running if not r.cancelled]
        prefill_tokens = 0
        while self.waiting and len(self.running) < cfg.capacity:
            r = self.waiting.popleft()
            if r.cancelled:
                continue
            r.admit_vt = self.vt
            prefill_tokens += r.prompt_len - r.cached
            self.running.append(r)
            r.concurrent = len(self.running)
        return prefill_tokens

    def tick_duration(self, prefill_tokens: int) -> float:
        cfg = self.config
        step = cfg.decode_base_s + cfg.decode_per_seq_s * len(self.running)
        return prefill_tokens * cfg.prefill_per_token_s + cfg.tick_tokens * step

    def advance(self, dt: float) -> list[SimRequest]:
        """Finish the tick of length `dt` started after `admit()`: emit tokens, return requests that
        progressed (their `wake` queues are signalled by the caller's choice)."""
        cfg = self.config
        step = cfg.decode_base_s + cfg.decode_per_seq_s * len(self.running)
        self.vt += dt
        self.busy_vt += dt
        prefill_end = self.vt - cfg.tick_tokens * step
        progressed: list[SimRequest] = []
        still: list[SimRequest] = []
        for r in self.running:
            if r.cancelled:
                continue
            before = r.generated
            r.generated = min(r.target_len, r.generated + cfg.tick_tokens)
            self.tokens_out += r.generated - before
            if r.first_vt is None:
                r.first_vt = prefill_end + step
            if r.generated >= r.target_len:
                r.done_vt = self.vt
                self.completed += 1
                progressed.append(r)
                continue
            if before == 0 or (cfg.stream_every and r.generated // cfg.stream_every != before // cfg.stream_every):
                progressed.append(r)
            still.append(r)
        self.running = still
        return progressed

    def stats(self) -> dict[str, Any]:
        return {"simulation": True, "virtual_time_s": self.vt, "busy_virtual_time_s": self.busy_vt,
                "waiting": len(self.waiting), "running": len(self.running), "tokens_out": self.tokens_out,
                "completed": self.completed, "capacity": self.config.capacity}


def perf_metrics(req: SimRequest, config: SimConfig) -> dict[str, Any]:
    """The `perf_metrics` of a simulated request, in model seconds."""
    admit = req.admit_vt if req.admit_vt is not None else req.arrival_vt
    first = req.first_vt if req.first_vt is not None else admit
    done = req.done_vt if req.done_vt is not None else first
    prefill = (req.prompt_len - req.cached) * config.prefill_per_token_s
    return {"prefill-queue-duration": round(admit - req.arrival_vt, 6),
            "prefill-duration": round(prefill, 6),
            "generation-queue-duration": 0.0,
            "server-time-to-first-token": round(first - req.arrival_vt, 6),
            "server-processing-time": round(done - req.arrival_vt, 6),
            "num-concurrent-requests": req.concurrent,
            "prompt-tokens": req.prompt_len,
            "cached-prompt-tokens": req.cached,
            "deployment": "simulated",
            "simulation": True}


