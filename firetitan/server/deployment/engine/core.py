"""Engine loop: schedule -> execute -> update on its own thread, fed by a typed inbox; streams outputs, swaps weights."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from firetitan.logging import get_logger
from firetitan.server.deployment.detokenize import Decoder, IncrementalText, stream_decoding
from firetitan.server.deployment.engine.inbox import Abort, InboxEngine, Submit, Swap
from firetitan.server.deployment.engine.request import EngineRequest, RequestState, StepOutput
from firetitan.server.deployment.engine.runner import DecodeOptions, ModelRunner
from firetitan.server.deployment.engine.scheduler import Scheduler, StepDecision
from firetitan.server.deployment.weight_copy import copy_weights
from firetitan.torch_threads import own_pool

log = get_logger("firetitan.deployment.engine")

Emit = Callable[[list[tuple[EngineRequest, StepOutput]]], None]

# Prefill-queue histogram buckets (seconds), fine at the low end where a healthy queue sits.
PREFILL_QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass
class WeightSwap:
    """New weights prepared off-thread, applied by the engine between steps."""

    state_dict: dict[str, torch.Tensor]
    version: str
    mode: str  # "ASYNC" swaps at the next step boundary; "SYNC" drains running requests first
    on_done: Callable[[BaseException | None], None]
    queued_at: float = field(default_factory=time.monotonic)
    source_dir: Path | None = None  # the same weights as an HF directory, for engines that reload from disk (vLLM)


@dataclass
class EngineStats:
    """Counters read by /metrics (written by the engine thread only)."""

    generated_tokens: int = 0
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    finished: dict[str, int] = field(default_factory=dict)
    steps: int = 0
    swaps: int = 0
    last_swap_seconds: float = 0.0
    prefill_queue_counts: list[int] = field(default_factory=lambda: [0] * (len(PREFILL_QUEUE_BUCKETS) + 1))
    prefill_queue_sum: float = 0.0
    prefill_queue_count: int = 0
    recent: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=4096))

    def observe_prefill_queue(self, seconds: float) -> None:
        index = next((i for i, b in enumerate(PREFILL_QUEUE_BUCKETS) if seconds <= b), len(PREFILL_QUEUE_BUCKETS))
        self.prefill_queue_counts[index] += 1
        self.prefill_queue_sum += seconds
        self.prefill_queue_count += 1

    def tokens_per_second(self, window: float = 10.0) -> float:
        now = time.monotonic()
        points = [(t, n) for t, n in list(self.recent) if now - t <= window]
        if not points:
            return 0.0
        span = max(now - points[0][0], 1e-3)
        return sum(n for _, n in points) / span


class Engine(InboxEngine):
    """Continuous batching: each step is `scheduler.schedule()` -> `runner.execute()` -> `scheduler.update()`.

    Everything touching torch runs on the engine thread; other threads talk to it only through
    `submit`, `abort` and `swap_weights` (typed messages on a thread-safe inbox). Outputs leave through
    `emit`, called once per step with every request's output of that step.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Decoder, *, emit: Emit, policy_version: str,
                 max_running_seqs: int = 64, max_cached_tokens: int = 65536, eos_token_ids: Iterable[int] = (),
                 seed: int = 0, max_prefill_tokens: int = 4096, max_kv_tokens: int | None = None,
                 threads: int | None = None, decode: DecodeOptions = DecodeOptions()) -> None:
        super().__init__()
        self.threads = threads  # torch threads the engine thread takes (`torch_threads.own_pool`); None: as is
        self.model = model
        self.tokenizer = tokenizer
        self._decode_stream = stream_decoding(tokenizer)  # None: transformers' window decoding
        self.runner = ModelRunner(model, max_running_seqs, seed=seed, max_kv_tokens=max_kv_tokens,
                                  options=decode)
        self.scheduler = Scheduler(max_running_seqs, max_cached_tokens, max_prefill_tokens,
                                   eos_token_ids=eos_token_ids, max_positions=self.runner.max_positions,
                                   policy_version=policy_version)
        self.stats = EngineStats()
        self._emit = emit
        self._pending_swap: WeightSwap | None = None

    @property
    def policy_version(self) -> str:
        return self.scheduler.policy_version

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def cached_tokens(self) -> int:
        return self.runner.cache.used_tokens

    @property
    def reserved_tokens(self) -> int:
        return self.scheduler.reserved_tokens

    @property
    def max_cached_tokens(self) -> int:
        return self.scheduler.max_cached_tokens

    # ---- engine thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        if self.threads is not None:
            own_pool(self.threads)
        while not self._stopped.is_set():
            idle = self.scheduler.num_requests == 0 and self._pending_swap is None
            self._drain_inbox(block=idle)
            if self._stopped.is_set():
                break
            self._maybe_swap()
            decision = self.scheduler.schedule()
            if decision.empty:
                if decision.freed:  # nothing left to run: the cache is simply empty
                    self.runner.cache.reset(keep_storage=True)
                continue
            try:
                output = self.runner.execute(decision)
                outputs = self.scheduler.update(decision, output)
            except Exception as exc:  # a failed step must not take the worker down: fail its requests
                log.exception("engine_step_failed")
                self._fail_all(exc)
                continue
            self._record(decision, outputs)
            self._emit(outputs)
        self._fail_all(RuntimeError("engine stopped"))

    def _handle(self, message: Submit | Abort | Swap) -> None:
        match message:
            case Submit(request):
                request.concurrent_at_arrival = self.scheduler.num_requests
                request.text = IncrementalText(self.tokenizer, request.options.stop, self._decode_stream)
                self.scheduler.add(request)
            case Abort(request_id):
                request = self.scheduler.get(request_id)
                if request is not None:
                    self.scheduler.finish(request, RequestState.ABORTED, "abort")
                    self._count_finished("abort")
                    self._emit([(request, StepOutput([], "", "abort", request.perf_metrics()))])
            case Swap(swap):
                if self._pending_swap is not None:  # the route serialises loads; a newer one supersedes
                    self._pending_swap.on_done(RuntimeError("superseded by a newer hot-load"))
                self._pending_swap = swap
                if swap.mode == "SYNC":
                    self.scheduler.admitting = False

    def _maybe_swap(self) -> None:
        swap = self._pending_swap
        if swap is None or (swap.mode == "SYNC" and self.scheduler.running):
            return
        self._pending_swap = None
        started = time.monotonic()
        try:
            copy_weights(self.model, swap.state_dict)  # in place: the decode step's fused copies see it
            self.scheduler.set_policy_version(swap.version)
            self.stats.swaps += 1
            self.stats.last_swap_seconds = time.monotonic() - started
            log.info("weights_swapped", policy_version=swap.version, mode=swap.mode,
                     seconds=round(self.stats.last_swap_seconds, 4), running=len(self.scheduler.running))
            error: BaseException | None = None
        except Exception as exc:
            error = exc
        finally:
            self.scheduler.admitting = True
        swap.on_done(error)

    def _record(self, decision: StepDecision, outputs: list[tuple[EngineRequest, StepOutput]]) -> None:
        stats = self.stats
        for request in decision.admitted:
            stats.observe_prefill_queue((request.prefill_start or request.arrival) - request.arrival)
            stats.prompt_tokens += len(request.prompt)
            stats.cached_prompt_tokens += request.cached_prompt_tokens
        for _request, out in outputs:
            if out.finish_reason is not None:
                self._count_finished(out.finish_reason)
        stats.generated_tokens += len(outputs)
        stats.steps += 1
        stats.recent.append((time.monotonic(), len(outputs)))

    def _count_finished(self, reason: str) -> None:
        self.stats.finished[reason] = self.stats.finished.get(reason, 0) + 1

    def _fail_all(self, exc: BaseException) -> None:
        gone = self.scheduler.abort_all()
        self.runner.cache.reset()
        outputs = [(r, StepOutput([], "", "error", {"error": f"{type(exc).__name__}: {exc}"})) for r in gone]
        for _ in gone:
            self._count_finished("error")
        if outputs:
            self._emit(outputs)
        if self._pending_swap is not None and self._stopped.is_set():
            self._pending_swap.on_done(RuntimeError("engine stopped"))
            self._pending_swap = None
