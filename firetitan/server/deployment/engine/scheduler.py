"""Scheduler: owns the waiting and running requests, decides each step's work, applies its results."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from firetitan.server.deployment.engine.request import (
    EngineRequest,
    RequestState,
    StepOutput,
    TokenOut,
)


@dataclass(frozen=True)
class PrefillChunk:
    """Prompt positions [start, end) of `request`, computed into the KV cache's staging row this step.

    The last chunk (`end == len(prompt)`) moves the prompt to the next live slot and samples its first token.
    """

    request: EngineRequest
    start: int
    end: int

    @property
    def last(self) -> bool:
        return self.end == len(self.request.prompt)


@dataclass
class StepDecision:
    """Everything the runner needs for one step, in slot order; the runner reads nothing else.

    Before computing, the runner frees `freed` (each: the last live slot moves into the hole, as the
    scheduler already did to its running list). Then `decode` occupy slots 0..D-1, `prefill` the next
    slots (their prompts are computed) and `copy` the slots after those (each copies its prompt's KV rows
    and last-position logits from the donor, a request with the same prompt under the same weights).
    """

    freed: list[int] = field(default_factory=list)
    decode: list[EngineRequest] = field(default_factory=list)
    prefill: list[EngineRequest] = field(default_factory=list)
    copy: list[tuple[EngineRequest, EngineRequest]] = field(default_factory=list)  # (request, donor)
    chunk: PrefillChunk | None = None  # a prompt longer than the step budget, one piece per step
    policy_version: str = ""

    @property
    def empty(self) -> bool:
        return not self.decode and not self.prefill and not self.copy and self.chunk is None

    @property
    def admitted(self) -> list[EngineRequest]:
        """Requests that join the decode batch this step (slots after `decode`, in this order)."""
        done = [self.chunk.request] if self.chunk is not None and self.chunk.last else []
        return self.prefill + [r for r, _ in self.copy] + done

    @property
    def batch(self) -> list[EngineRequest]:
        """The requests sampled this step, in the order of the runner's output rows."""
        return self.decode + self.admitted


@dataclass
class RunnerOutput:
    """What the runner computed for one decision (rows follow `StepDecision.batch`)."""

    tokens: list[int]
    logprobs: list[float]
    sampling_logprobs: list[float]
    top: list[list[tuple[int, float]] | None]
    prompt_logits: list[torch.Tensor]  # one per admitted request (prefill then copy): last-position logits
    prompt_logprobs: list[list[TokenOut] | None]  # one per prefill request: echo rows, else None


class Scheduler:
    """FIFO admission under a running-sequence limit and a cached-token budget; the one owner of state.

    `running` is the decode batch in KV slot order: request i lives in slot i. Finishing a request moves
    the last running request into its slot (the KV cache does the same when the next decision's `freed`
    is applied), so order and slots never disagree. Admission reserves each request's worst case
    (prompt + max_tokens), so a running request never needs to be preempted for cache space.
    `admitting = False` holds the queue (SYNC hot-load drain).
    """

    def __init__(self, max_running_seqs: int, max_cached_tokens: int, max_prefill_tokens: int = 4096, *,
                 eos_token_ids: Iterable[int] = (), max_positions: int = 1 << 30,
                 policy_version: str = "") -> None:
        self.max_running_seqs = max_running_seqs
        self.max_cached_tokens = max_cached_tokens
        self.max_prefill_tokens = max_prefill_tokens
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_positions = max_positions
        self.policy_version = policy_version
        self.waiting: deque[EngineRequest] = deque()
        self.running: list[EngineRequest] = []  # in KV slot order
        self.reserved_tokens = 0
        self.admitting = True
        self._live: dict[str, EngineRequest] = {}  # id -> request, only to resolve aborts
        self._prefixes: dict[tuple[int, ...], EngineRequest] = {}  # prompt -> running request holding its KV
        self._freed: list[int] = []
        self.partial: EngineRequest | None = None  # admitted, its prompt prefilled a chunk per step
        self._computed = 0  # prompt positions of `partial` already in the KV cache

    @property
    def num_requests(self) -> int:
        return len(self.waiting) + len(self.running) + (self.partial is not None)

    def add(self, request: EngineRequest) -> None:
        self._live[request.request_id] = request
        self.waiting.append(request)

    def get(self, request_id: str) -> EngineRequest | None:
        return self._live.get(request_id)

    def set_policy_version(self, version: str) -> None:
        """New weights: cached prompts were computed with the old ones, so none may be shared."""
        self.policy_version = version
        self._prefixes.clear()

    def schedule(self) -> StepDecision:
        """Pick this step's work; admitted requests move to RUNNING and take the next slots."""
        now = time.monotonic()
        decision = StepDecision(freed=self._freed, decode=list(self.running), policy_version=self.policy_version)
        self._freed = []
        for request in decision.decode:
            if request.first_decode is None:
                request.first_decode = now
        prefill_tokens = 0
        if self.partial is not None:  # the chunked prompt goes first; FIFO keeps the others behind it
            decision.chunk = self._next_chunk(self.max_prefill_tokens)
            prefill_tokens = decision.chunk.end - decision.chunk.start
        step_leaders: dict[tuple[int, ...], EngineRequest] = {}
        while self.admitting and self.waiting and self.partial is None:
            head = self.waiting[0]
            if len(self.running) + len(decision.prefill) + len(decision.copy) >= self.max_running_seqs:
                break
            if self.reserved_tokens + head.reserved_tokens > self.max_cached_tokens:
                break
            key = tuple(head.prompt)
            donor = None if head.options.echo else (self._prefixes.get(key) or step_leaders.get(key))
            # Bound one step's prefill so a burst of long prompts cannot stall every decode for long;
            # the first admission always goes through so a long prompt cannot starve. Copies are cheap.
            cost = 0 if donor is not None else len(head.prompt)
            if decision.admitted and cost and prefill_tokens + cost > self.max_prefill_tokens:
                break
            # A prompt longer than the whole budget is prefilled in chunks (never echoed ones: their
            # prompt logprobs need every position's logits at once), so it cannot stall running decodes.
            chunked = cost > self.max_prefill_tokens and not head.options.echo
            if chunked and (decision.admitted or prefill_tokens):
                break  # next step, with the whole budget
            self.waiting.popleft()
            head.advance(RequestState.RUNNING)
            head.prefill_start = now
            self.reserved_tokens += head.reserved_tokens
            prefill_tokens += cost
            if chunked:
                self.partial, self._computed = head, 0
                decision.chunk = self._next_chunk(self.max_prefill_tokens)
                break
            if donor is None:
                decision.prefill.append(head)
                step_leaders.setdefault(key, head)
            else:
                decision.copy.append((head, donor))
        if decision.chunk is not None and decision.chunk.last:
            self.partial = None
        # Slots follow the decision's row order: decode, then prefill, then copy, then a finished chunk.
        for request in decision.admitted:
            request.slot = len(self.running)
            request.prefill_version = self.policy_version
            self.running.append(request)
        return decision

    def _next_chunk(self, budget: int) -> PrefillChunk:
        request = self.partial
        assert request is not None
        start = self._computed
        end = min(len(request.prompt), start + budget)
        self._computed = end
        return PrefillChunk(request, start, end)

    def update(self, decision: StepDecision, output: RunnerOutput) -> list[tuple[EngineRequest, StepOutput]]:
        """Apply a step's tokens to its requests; finished ones leave (their slots are freed next step)."""
        stamp = time.monotonic()
        admitted = decision.admitted
        for request, logits in zip(admitted, output.prompt_logits, strict=True):
            request.prompt_logits = logits
            request.prefill_end = stamp
        for request, _donor in decision.copy:
            request.cached_prompt_tokens = len(request.prompt)
        whole = [decision.chunk.request] if decision.chunk is not None and decision.chunk.last else []
        for request in decision.prefill + whole:
            if not request.options.echo:
                self._prefixes.setdefault(tuple(request.prompt), request)
        echoes = dict(zip((id(r) for r in decision.prefill), output.prompt_logprobs, strict=True))
        outputs: list[tuple[EngineRequest, StepOutput]] = []
        for i, request in enumerate(decision.batch):
            if request.state is not RequestState.RUNNING:
                continue
            token = output.tokens[i]
            request.output_ids.append(token)
            first = request.first_token is None
            if first:
                request.first_token = stamp
            out = StepOutput([TokenOut(token, output.logprobs[i], output.sampling_logprobs[i],
                                       decision.policy_version, output.top[i])], "")
            if first:
                out.prompt = echoes.get(id(request))
            out.finish_reason = self._check_finish(request, token, out)
            if out.finish_reason is not None:
                self.finish(request, RequestState.FINISHED, out.finish_reason)
                out.metrics = request.perf_metrics()
            elif first:
                out.metrics = request.perf_metrics()
            outputs.append((request, out))
        return outputs

    def _check_finish(self, request: EngineRequest, token: int, out: StepOutput) -> str | None:
        text = request.text
        assert text is not None, "the engine attaches a detokenizer on submit"
        opts = request.options
        stop_ids = opts.stop_token_ids if opts.ignore_eos else opts.stop_token_ids | self.eos_token_ids
        if token in stop_ids:
            out.text = text.update(request.output_ids[:-1], final=True)
            return "stop"
        out.text = text.update(request.output_ids)
        if text.stopped:
            return "stop"
        at_limit = len(request.output_ids) >= opts.max_tokens
        at_context = len(request.prompt) + len(request.output_ids) >= self.max_positions
        if at_limit or at_context:
            out.text += text.update(request.output_ids, final=True)
            return "length"
        return None

    def finish(self, request: EngineRequest, state: RequestState, reason: str) -> None:
        """Take a request out (running or waiting), release its reservation and its slot."""
        if request.state is RequestState.RUNNING:
            self.reserved_tokens -= request.reserved_tokens
            slot = request.slot
            if slot is not None and slot < len(self.running) and self.running[slot] is request:
                last = self.running.pop()
                if last is not request:
                    self.running[slot] = last
                    last.slot = slot
                self._freed.append(slot)
            request.slot = None
            if request is self.partial:
                self.partial = None
        elif request.state is RequestState.WAITING:
            self.waiting.remove(request)
        key = tuple(request.prompt)
        if self._prefixes.get(key) is request:
            del self._prefixes[key]
        request.prompt_logits = None
        request.finish_reason = reason
        request.finished_at = time.monotonic()
        self._live.pop(request.request_id, None)
        request.advance(state)

    def abort_all(self) -> list[EngineRequest]:
        """Take every request out (a failed step or a stop); the caller resets the KV cache."""
        gone = list(self.running) + list(self.waiting) + ([self.partial] if self.partial is not None else [])
        self.partial = None
        for request in gone:
            request.slot = None
            request.prompt_logits = None
            request.finish_reason = "error"
            request.finished_at = time.monotonic()
            request.advance(RequestState.ABORTED)
        self.running.clear()
        self.waiting.clear()
        self.reserved_tokens = 0
        self._live.clear()
        self._prefixes.clear()
        self._freed = []
        return gone
