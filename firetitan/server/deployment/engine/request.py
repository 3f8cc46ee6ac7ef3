"""A generation request as a small state machine, its sampling options and its per-step outputs."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from firetitan.server.deployment.detokenize import IncrementalText


class RequestState(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"
    ABORTED = "aborted"


# Legal transitions; anything else is a bug in the engine, so `advance` raises.
_NEXT: dict[RequestState, frozenset[RequestState]] = {
    RequestState.WAITING: frozenset({RequestState.RUNNING, RequestState.ABORTED}),
    RequestState.RUNNING: frozenset({RequestState.FINISHED, RequestState.ABORTED}),
    RequestState.FINISHED: frozenset(),
    RequestState.ABORTED: frozenset(),
}


@dataclass(frozen=True)
class SamplingOptions:
    """Per-request sampling knobs, already validated by the HTTP layer."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: frozenset[int] = frozenset()
    seed: int | None = None
    top_logprobs: int = 0  # alternatives reported per token (raw logprobs)
    ignore_eos: bool = False  # only max_tokens / stop ids / stop strings end the request
    echo: bool = False  # also report the prompt's own logprobs (teacher-forced, first row unconditional)


@dataclass
class TokenOut:
    """One generated token as reported to the client."""

    token_id: int
    logprob: float
    sampling_logprob: float
    policy_version: str
    top: list[tuple[int, float]] | None = None


@dataclass
class StepOutput:
    """What one engine step produced for one request (tokens, text delta, and the end if it ended)."""

    tokens: list[TokenOut]
    text: str
    finish_reason: str | None = None  # "stop" | "length" | "abort" when the request ended this step
    metrics: dict[str, Any] | None = None  # perf figures, set on the first and the last output
    prompt: list[TokenOut] | None = None  # echo: the prompt's tokens and logprobs, on the first output


@dataclass(eq=False)
class EngineRequest:
    """Mutable engine-side state of one request; owned by the engine thread after submission."""

    request_id: str
    prompt: list[int]
    options: SamplingOptions
    arrival: float = field(default_factory=time.monotonic)
    state: RequestState = RequestState.WAITING
    output_ids: list[int] = field(default_factory=list)
    slot: int | None = None
    generator: torch.Generator | None = None
    finish_reason: str | None = None
    concurrent_at_arrival: int = 0
    prefill_start: float | None = None
    prefill_end: float | None = None
    first_decode: float | None = None
    first_token: float | None = None
    finished_at: float | None = None
    cached_prompt_tokens: int = 0
    prefill_version: str | None = None
    prompt_logits: torch.Tensor | None = None  # last-position logits, kept while running for sharing
    text: IncrementalText | None = None  # incremental detokenizer, attached when the engine accepts it

    def __post_init__(self) -> None:
        if self.options.seed is not None:
            self.generator = torch.Generator().manual_seed(int(self.options.seed))

    @property
    def reserved_tokens(self) -> int:
        """Worst-case cache positions this request can occupy (admission reserves them up front)."""
        return len(self.prompt) + self.options.max_tokens

    def advance(self, new: RequestState) -> None:
        if new not in _NEXT[self.state]:
            raise RuntimeError(f"request {self.request_id}: illegal transition {self.state} -> {new}")
        self.state = new

    def perf_metrics(self) -> dict[str, Any]:
        """Fireworks-named per-request telemetry (seconds), with what is known so far."""
        now = self.finished_at or time.monotonic()
        out: dict[str, Any] = {
            "num-concurrent-requests": self.concurrent_at_arrival,
            "prompt-tokens": len(self.prompt),
            "cached-prompt-tokens": self.cached_prompt_tokens,
        }
        if self.prefill_start is not None:
            out["prefill-queue-duration"] = round(self.prefill_start - self.arrival, 6)
        if self.prefill_end is not None:
            out["prefill-duration"] = round(self.prefill_end - (self.prefill_start or self.prefill_end), 6)
            # Time spent ready for decoding but waiting for the next decode step to pick it up.
            gen_start = self.first_decode if self.first_decode is not None else self.prefill_end
            out["generation-queue-duration"] = round(max(0.0, gen_start - self.prefill_end), 6)
        if self.first_token is not None:
            out["server-time-to-first-token"] = round(self.first_token - self.arrival, 6)
        if self.finished_at is not None:
            out["server-processing-time"] = round(now - self.arrival, 6)
            out["completion-tokens"] = len(self.output_ids)
            if self.prefill_end is not None:
                out["generation-duration"] = round(now - self.prefill_end, 6)
        return out
