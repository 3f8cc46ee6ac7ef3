"""Engine loop: runs scheduler decisions on the model runner in its own thread, streams outputs, swaps weights."""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from firetitan.logging import get_logger
from firetitan.server.deployment.detokenize import Decoder, IncrementalText
from firetitan.server.deployment.engine_runner import ModelRunner
from firetitan.server.deployment.engine_scheduler import Scheduler
from firetitan.server.deployment.request import EngineRequest, RequestState, StepOutput, TokenOut
from firetitan.server.deployment.sampling import sample

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


class Engine:
    """Continuous batching: each iteration decodes every running request and prefills admitted ones.

    Everything touching torch runs on the engine thread; other threads talk to it only through
    `submit`, `abort` and `swap_weights` (a thread-safe inbox). Outputs leave through `emit`, called
    once per step with every request's output of that step.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Decoder, *, emit: Emit, policy_version: str,
                 max_running_seqs: int = 64, max_cached_tokens: int = 65536, eos_token_ids: Iterable[int] = (),
                 seed: int = 0) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.runner = ModelRunner(model, max_running_seqs)
        self.scheduler = Scheduler(max_running_seqs, max_cached_tokens)
        self.policy_version = policy_version
        self.eos_token_ids = frozenset(eos_token_ids)
        self.stats = EngineStats()
        self._emit = emit
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._slots: list[EngineRequest] = []
        self._live: dict[str, EngineRequest] = {}
        self._text: dict[str, IncrementalText] = {}
        self._ignore_eos: set[str] = set()
        self._pending_swap: WeightSwap | None = None
        self._prompt_donors: dict[tuple[int, ...], EngineRequest] = {}
        self._admitted_logits = torch.empty(0)
        self._generator = torch.Generator().manual_seed(seed)
        self._thread: threading.Thread | None = None
        self._stopped = threading.Event()

    # ---- thread-safe API -------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="firetitan-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._inbox.put(("stop", None))
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, request: EngineRequest, ignore_eos: bool = False) -> None:
        self._inbox.put(("add", (request, ignore_eos)))

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))

    def swap_weights(self, swap: WeightSwap) -> None:
        self._inbox.put(("swap", swap))

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def cached_tokens(self) -> int:
        return self.runner.cache.used_tokens

    # ---- engine thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stopped.is_set():
            idle = self.scheduler.num_requests == 0 and self._pending_swap is None
            self._drain_inbox(block=idle)
            if self._stopped.is_set():
                break
            self._maybe_swap()
            decision = self.scheduler.schedule()
            if decision.empty:
                continue
            try:
                self._step(decision.admitted)
            except Exception as exc:  # a failed step must not take the worker down: fail its requests
                log.exception("engine_step_failed")
                self._fail_all(exc)
        self._fail_all(RuntimeError("engine stopped"))

    def _drain_inbox(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            self._handle(*item)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _handle(self, kind: str, payload: Any) -> None:
        if kind == "add":
            request, ignore_eos = payload
            request.concurrent_at_arrival = self.scheduler.num_requests
            self._live[request.request_id] = request
            self._text[request.request_id] = IncrementalText(self.tokenizer, request.options.stop)
            if ignore_eos:
                self._ignore_eos.add(request.request_id)
            self.scheduler.add(request)
        elif kind == "abort":
            request = self._live.get(payload)
            if request is not None:
                self._finish(request, RequestState.ABORTED, "abort")
                self._emit([(request, StepOutput([], "", "abort", request.perf_metrics()))])
        elif kind == "swap":
            if self._pending_swap is not None:  # the route serialises loads; a newer one supersedes
                self._pending_swap.on_done(RuntimeError("superseded by a newer hot-load"))
            self._pending_swap = payload
            if payload.mode == "SYNC":
                self.scheduler.admitting = False
        elif kind == "stop":
            self._stopped.set()

    def _maybe_swap(self) -> None:
        swap = self._pending_swap
        if swap is None or (swap.mode == "SYNC" and self.scheduler.running):
            return
        self._pending_swap = None
        started = time.monotonic()
        try:
            with torch.no_grad():
                _missing, unexpected = self.model.load_state_dict(swap.state_dict, strict=False)
            if unexpected:
                raise ValueError(f"unexpected weights {unexpected[:3]}")
            self.policy_version = swap.version
            self._prompt_donors.clear()  # cached prompts were computed with the old weights
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

    def _step(self, admitted: list[EngineRequest]) -> None:
        decode_batch = list(self._slots)
        logits: list[torch.Tensor] = []
        now = time.monotonic()
        if decode_batch:
            for request in decode_batch:
                if request.first_decode is None:
                    request.first_decode = now
            logits.append(self.runner.decode([r.output_ids[-1] for r in decode_batch]))
        if admitted:
            admitted[:] = self._prefill(admitted, now)
            logits.append(self._admitted_logits)
        batch = decode_batch + admitted
        opts = [r.options for r in batch]
        result = sample(torch.cat(logits), [o.temperature for o in opts], [o.top_k for o in opts],
                        [o.top_p for o in opts], [r.generator for r in batch], self._generator)
        tokens = result.tokens.tolist()
        lps = result.logprobs.tolist()
        slps = result.sampling_logprobs.tolist()
        outputs: list[tuple[EngineRequest, StepOutput]] = []
        stamp = time.monotonic()
        for i, request in enumerate(batch):
            token = tokens[i]
            request.output_ids.append(token)
            first = request.first_token is None
            if first:
                request.first_token = stamp
            top = None
            if request.options.top_logprobs > 0:
                values, ids = torch.topk(result.raw[i], request.options.top_logprobs)
                top = list(zip(ids.tolist(), values.tolist(), strict=True))
            out = StepOutput([TokenOut(token, lps[i], slps[i], self.policy_version, top)], "")
            out.finish_reason = self._check_finish(request, token, out)
            if out.finish_reason is not None:
                self._finish(request, RequestState.FINISHED, out.finish_reason)
                out.metrics = request.perf_metrics()
            elif first:
                out.metrics = request.perf_metrics()
            outputs.append((request, out))
        self.stats.generated_tokens += len(batch)
        self.stats.steps += 1
        self.stats.recent.append((stamp, len(batch)))
        self._emit(outputs)

    def _prefill(self, admitted: list[EngineRequest], now: float) -> list[EngineRequest]:
        """Prefill the admitted requests; returns them in their new slot order.

        Prompt sharing: a prompt identical to one already prefilled under the same weights (a live
        request, or another request admitted in this step, as with n samples per prompt) is not
        recomputed: its KV rows are copied from that request's slot and the last-position logits reused.
        """
        donors: list[EngineRequest | None] = []
        leaders: list[EngineRequest] = []
        followers: list[EngineRequest] = []
        step_leaders: dict[tuple[int, ...], EngineRequest] = {}
        for request in admitted:
            key = tuple(request.prompt)
            donor = self._prompt_donors.get(key)
            if donor is not None and donor.prefill_version != self.policy_version:
                donor = None
            if donor is None and key not in step_leaders:
                step_leaders[key] = request
                leaders.append(request)
            else:
                followers.append(request)
                donors.append(donor or step_leaders[key])
        ordered = leaders + followers
        slots = self.runner.cache.allocate(len(ordered))
        for slot, request in zip(slots, ordered, strict=True):
            request.slot = slot
            request.prefill_version = self.policy_version
            self._slots.append(request)
            self.stats.observe_prefill_queue((request.prefill_start or now) - request.arrival)
            self.stats.prompt_tokens += len(request.prompt)
        if leaders:
            rows = self.runner.prefill(range(slots.start, slots.start + len(leaders)), [r.prompt for r in leaders])
            for request, row in zip(leaders, rows, strict=True):
                request.prompt_logits = row
                self._prompt_donors[tuple(request.prompt)] = request
        for request, donor in zip(followers, donors, strict=True):
            assert donor.slot is not None and request.slot is not None and donor.prompt_logits is not None
            self.runner.cache.copy_prefix(donor.slot, request.slot, len(request.prompt))
            request.prompt_logits = donor.prompt_logits
            request.cached_prompt_tokens = len(request.prompt)
            self.stats.cached_prompt_tokens += len(request.prompt)
        done = time.monotonic()
        for request in ordered:
            request.prefill_end = done
        self.scheduler.start_running(ordered)
        logits = torch.stack([r.prompt_logits for r in ordered])  # type: ignore[misc]
        self._admitted_logits = logits
        return ordered

    def _check_finish(self, request: EngineRequest, token: int, out: StepOutput) -> str | None:
        rid = request.request_id
        text = self._text[rid]
        opts = request.options
        stop_ids = opts.stop_token_ids if rid in self._ignore_eos else opts.stop_token_ids | self.eos_token_ids
        if token in stop_ids:
            out.text = text.update(request.output_ids[:-1], final=True)
            return "stop"
        out.text = text.update(request.output_ids)
        if text.stopped:
            return "stop"
        at_limit = len(request.output_ids) >= opts.max_tokens
        at_context = len(request.prompt) + len(request.output_ids) >= self.runner.max_positions
        if at_limit or at_context:
            out.text += text.update(request.output_ids, final=True)
            return "length"
        return None

    def _finish(self, request: EngineRequest, state: RequestState, reason: str) -> None:
        if request.slot is not None:
            slot = request.slot
            moved = self.runner.cache.free(slot)
            last = self._slots.pop()
            if moved is not None:
                self._slots[slot] = last
                last.slot = slot
            request.slot = None
        key = tuple(request.prompt)
        if self._prompt_donors.get(key) is request:
            del self._prompt_donors[key]
        request.prompt_logits = None
        self.scheduler.finish(request, state, reason)
        self.stats.finished[reason] = self.stats.finished.get(reason, 0) + 1
        self._live.pop(request.request_id, None)
        self._text.pop(request.request_id, None)
        self._ignore_eos.discard(request.request_id)

    def _fail_all(self, exc: BaseException) -> None:
        outputs = []
        for request in list(self._live.values()):
            self._finish(request, RequestState.ABORTED, "error")
            outputs.append((request, StepOutput([], "", "error", {"error": f"{type(exc).__name__}: {exc}"})))
        if outputs:
            self._emit(outputs)
        if self._pending_swap is not None and self._stopped.is_set():
            self._pending_swap.on_done(RuntimeError("engine stopped"))
            self._pending_swap = None
