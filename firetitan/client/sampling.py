"""`DeploymentSampler`: the sampling policy (fan-out, concurrency-controller slots, retries) over the completions wire."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
import time
import uuid
import warnings
from collections import deque
from collections.abc import Awaitable, Generator, Mapping, Sequence
from typing import Any, Literal

import aiohttp

from firetitan.client.completion_wire import ApiStyle, Attempt, AttemptFailed, CompletionRequest, read_answer
from firetitan.client.concurrency import (
    AdaptiveConcurrencyController,
    ConcurrencyController,
    FixedConcurrencyController,
)
from firetitan.client.replicas import ReplicaRouting, reachable_replica_urls
from firetitan.client.sampled import SampledCompletion, SampledRequestResult
from firetitan.client.server_metrics import ServerMetrics, parse_server_metrics
from firetitan.errors import (
    ConfigError,
    DeploymentSamplerTimeoutError,
    FiretitanError,
    InvalidRequestError,
    NotFoundError,
    SamplingRequestError,
    from_response,
)
from firetitan.logging import get_logger
from firetitan.stats import percentile
from firetitan.transport import LoopSessions, RetryPolicy, bearer, parse_retry_after, request_json

log = get_logger("firetitan.client.sampling")

__all__ = ["ApiStyle", "DeploymentSampler", "FanOut", "SampledCompletion", "SampledRequestResult"]

NOT_READY_STATUSES = frozenset({404, 425})
# Consumed here, never sent to the server.
_CLIENT_ONLY_KWARGS = frozenset({"http_timeout", "sampling_context", "timeout_diagnostic_context"})
# "requests": `n` completions are `n` independent streaming requests (the hosted SDK's behaviour).
# "choices": one streaming request with `n` choices; the deployment prefills the prompt once and
# the stream, the HTTP handling and the retry are shared by the group.
FanOut = Literal["requests", "choices"]
MAX_CHOICES_PER_REQUEST = 128  # the deployment's limit on `n`; larger groups are split into requests
METRICS_LIMIT = 65_536  # attempt records kept between drains (a ring: the oldest go first)


class DeploymentSampler:
    """Samples completions from one deployment URL.

    The positional parameters are the hosted SDK's (`inference_url, model, api_key, tokenizer,
    concurrency_controller, max_concurrency, additional_headers`); firetitan's extras are keyword-only.
    `api="fireworks"` posts to `/inference/v1/completions` (token-id prompts, `raw_output`,
    `perf_metrics`); `api="openai"` posts to `/v1/completions` for any OpenAI-compatible server.
    With `direct_replicas=True`, `inference_url` must be a firetitan deployment resource URL: requests
    go straight to its replicas when they are reachable (see `firetitan.client.replicas`).
    `fanout` picks how `n > 1` completions of one prompt are requested (see `FanOut`); either way
    the concurrency controller counts `n` slots, so its window is in sequences. `stream=False` asks
    for one JSON answer per request instead of a token stream: the same fields at a fraction of the
    HTTP work, for callers that only use whole completions (RL rollouts).
    Retries follow `RetryPolicy(max_attempts, backoff_base, backoff_max)`; a `Retry-After` is a floor.
    """

    def __init__(self, inference_url: str, model: str = "default", api_key: str | None = None,
                 tokenizer: Any = None, concurrency_controller: ConcurrencyController | None = None,
                 max_concurrency: int | None = None, additional_headers: dict[str, str] | None = None, *,
                 request_context: dict[str, Any] | None = None, http_timeout: float = 600.0,
                 max_attempts: int = 7, api: ApiStyle = "fireworks", backoff_base: float = 2.0,
                 backoff_max: float = 30.0, not_ready_delay: float = 5.0, not_ready_retries: int = 10,
                 connect_timeout: float = 30.0, direct_replicas: bool = False, replica_refresh_s: float = 10.0,
                 fanout: FanOut = "requests", stream: bool = True, metrics_limit: int = METRICS_LIMIT) -> None:
        if http_timeout <= 0:
            raise ConfigError(f"http_timeout must be > 0, got {http_timeout}", field="http_timeout")
        if api not in ("fireworks", "openai"):
            raise ConfigError(f"api must be 'fireworks' or 'openai', got {api!r}", field="api")
        if fanout not in ("requests", "choices"):
            raise ConfigError(f"fanout must be 'requests' or 'choices', got {fanout!r}", field="fanout")
        if metrics_limit < 1:
            raise ConfigError(f"metrics_limit must be >= 1, got {metrics_limit}", field="metrics_limit")
        if max_concurrency is not None:
            warnings.warn("max_concurrency is deprecated: pass concurrency_controller="
                          "FixedConcurrencyController(n)", DeprecationWarning, stacklevel=2)
            concurrency_controller = concurrency_controller or FixedConcurrencyController(max_concurrency)
        self.base_url = inference_url.rstrip("/")
        self.model = model
        self.api_key = api_key
        self.tokenizer = tokenizer
        self.controller: ConcurrencyController = concurrency_controller or AdaptiveConcurrencyController()
        self.additional_headers = dict(additional_headers or {})
        self.request_context = request_context
        self.http_timeout = float(http_timeout)
        self.policy = RetryPolicy(max_attempts=int(max_attempts), backoff_base=backoff_base, backoff_max=backoff_max)
        self.api: ApiStyle = api
        self.fanout: FanOut = fanout
        self.stream = bool(stream)
        self.not_ready_delay = not_ready_delay
        self.not_ready_retries = not_ready_retries
        self.connect_timeout = connect_timeout
        self.routing = ReplicaRouting(self._fetch_replicas, refresh_s=replica_refresh_s) if direct_replicas else None
        self._metrics: deque[ServerMetrics] = deque(maxlen=int(metrics_limit))
        self._metrics_lock = threading.Lock()
        self._sessions = LoopSessions({**bearer(api_key), **self.additional_headers})

    @property
    def inference_url(self) -> str:
        return self.base_url

    @property
    def max_attempts(self) -> int:
        return self.policy.max_attempts

    @property
    def concurrency_controller(self) -> ConcurrencyController:
        return self.controller

    @property
    def path(self) -> str:
        return "/inference/v1/completions" if self.api == "fireworks" else "/v1/completions"

    def close(self) -> Awaitable[None]:
        """Close this loop's HTTP session (sessions of other loops close when their loop shuts down).

        Await it (`await sampler.close()`), or call it plainly as the official SDK's synchronous
        `close()` is called: inside a running loop the closing is then scheduled on that loop; with
        no loop running there is nothing to close here (every session closes with its own loop).
        """
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return _Closed()
        return loop.create_task(self._aclose())

    async def _aclose(self) -> None:
        if self.routing is not None:
            await self.routing.cancel_lookup(asyncio.get_running_loop())
        await self._sessions.close()

    async def __aenter__(self) -> DeploymentSampler:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------------ public API

    async def sample_with_tokens(self, messages: Sequence[Any], n: int = 1, max_tokens: int = 1024,
                                 temperature: float = 1.0, max_seq_len: int | None = None,
                                 **kwargs: Any) -> list[SampledCompletion]:
        """Apply the chat template to one conversation and sample `n` completions of it.

        A list of conversations is also accepted; their completions are returned in order.
        """
        if self.tokenizer is None:
            raise ConfigError("sample_with_tokens needs a tokenizer; pass tokenizer= to DeploymentSampler",
                              field="tokenizer")
        if messages and all(isinstance(m, list | tuple) for m in messages):
            groups = await asyncio.gather(*(self.sample_with_tokens(
                list(conv), n=n, max_tokens=max_tokens, temperature=temperature, max_seq_len=max_seq_len,
                **kwargs) for conv in messages))
            return [c for g in groups for c in g]
        prompt = self._apply_chat_template(list(messages))
        return await self.sample_with_prompt_tokens(prompt, n=n, max_tokens=max_tokens, temperature=temperature,
                                                    max_seq_len=max_seq_len, **kwargs)

    async def sample_with_prompt_tokens(self, prompt_token_ids: Sequence[int], n: int = 1, max_tokens: int = 1024,
                                        temperature: float = 1.0, max_seq_len: int | None = None,
                                        stop: list[str] | list[int] | None = None,
                                        prompt_cache_key: str | None = None,
                                        additional_headers_snapshot: Mapping[str, str] | None = None,
                                        **kwargs: Any) -> list[SampledCompletion]:
        """Sample `n` completions of a token-id prompt: `n` requests, or one with `n` choices (`fanout`).

        Extra keyword arguments go into the request body (`logprobs`, `top_logprobs`, `echo`,
        `top_p`, `top_k`, `seed`, `ignore_eos`, ...); `http_timeout` overrides the sampler's.
        """
        prompt = [int(t) for t in prompt_token_ids]
        if n < 1:
            raise InvalidRequestError(f"n must be >= 1, got {n}", field="n")
        if max_seq_len is not None and len(prompt) >= max_seq_len:
            log.warning("prompt_too_long", prompt_len=len(prompt), max_seq_len=max_seq_len)
            return []
        body = self._build_body(prompt, max_tokens, temperature, stop, prompt_cache_key, kwargs)
        sizes = ([min(MAX_CHOICES_PER_REQUEST, n - i) for i in range(0, n, MAX_CHOICES_PER_REQUEST)]
                 if self.fanout == "choices" else [1] * n)
        requests = [self._request(prompt, {**body, "n": k}, k, kwargs, None) for k in sizes]
        groups = await asyncio.gather(*(self._run(r, additional_headers_snapshot) for r in requests))
        results = [c for g in groups for c in g[0]]
        if max_seq_len is not None:
            results = [r for r in results if len(r.full_tokens) <= max_seq_len]
        return results

    async def sample_with_prompt_tokens_result(self, prompt_token_ids: Sequence[int], *, max_tokens: int = 1024,
                                               temperature: float = 1.0, max_seq_len: int | None = None,
                                               stop: list[str] | list[int] | None = None,
                                               prompt_cache_key: str | None = None,
                                               additional_headers_snapshot: Mapping[str, str] | None = None,
                                               logical_request_id: str | None = None,
                                               **kwargs: Any) -> SampledRequestResult:
        """One completion of one prompt, with what it took: attempts, wall time, the request id."""
        prompt = [int(t) for t in prompt_token_ids]
        if max_seq_len is not None and len(prompt) >= max_seq_len:
            raise InvalidRequestError(f"the prompt ({len(prompt)} tokens) already reaches max_seq_len "
                                      f"{max_seq_len}", field="max_seq_len")
        started = time.monotonic()
        body = self._build_body(prompt, max_tokens, temperature, stop, prompt_cache_key, kwargs)
        request = self._request(prompt, {**body, "n": 1}, 1, kwargs, logical_request_id)
        completions, attempts = await self._run(request, additional_headers_snapshot)
        if max_seq_len is not None:
            completions = [c for c in completions if len(c.full_tokens) <= max_seq_len]
        return SampledRequestResult(completions=completions, server_metrics=completions[0].metrics if completions
                                    else None, logical_request_id=request.request_id, attempts=attempts,
                                    wall_seconds=time.monotonic() - started)

    def drain_metrics(self) -> list[ServerMetrics]:
        """Return and forget the metrics of every attempt since the last drain (at most `metrics_limit`,
        the most recent)."""
        with self._metrics_lock:
            out = list(self._metrics)
            self._metrics.clear()
        return out

    # ------------------------------------------------------------------ request building

    def _apply_chat_template(self, messages: list[dict[str, Any]]) -> list[int]:
        ids = self.tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                                 return_dict=False)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        if ids and isinstance(ids[0], list):
            ids = ids[0]
        return [int(t) for t in ids]

    def _build_body(self, prompt: list[int], max_tokens: int, temperature: float, stop: Any,
                    prompt_cache_key: str | None, kw: dict[str, Any]) -> dict[str, Any]:
        # max_tokens=0 is allowed with echo: it scores the prompt without sampling (compute_logprobs).
        if max_tokens < (0 if kw.get("echo") else 1):
            raise InvalidRequestError(f"max_tokens must be >= 1 (>= 0 with echo=True), got {max_tokens}",
                                      field="max_tokens")
        body: dict[str, Any] = {"model": self.model, "prompt": prompt, "n": 1, "max_tokens": int(max_tokens),
                                "temperature": float(temperature), "stream": self.stream}
        if self.api == "fireworks":
            body.update(perf_metrics_in_response=True, raw_output=True, top_p=1.0, top_k=0)
        elif self.stream:
            body.update(stream_options={"include_usage": True})
        for key, value in kw.items():
            if key not in _CLIENT_ONLY_KWARGS:
                body[key] = value
        if kw.get("top_logprobs") and not kw.get("logprobs"):
            body["logprobs"] = True  # top-k rows ride on the logprob rows
        stop = body.get("stop") if stop is None else stop
        if stop is not None:
            body["stop"] = self._stop_strings(stop)
        if prompt_cache_key is not None:
            body["prompt_cache_key"] = prompt_cache_key
        return body

    def _stop_strings(self, stop: Any) -> list[str]:
        items = stop if isinstance(stop, list | tuple) else [stop]
        out: list[str] = []
        for s in items:
            if isinstance(s, int):
                if self.tokenizer is None:
                    raise InvalidRequestError("integer stop ids need a tokenizer to decode them", field="stop")
                out.append(self.tokenizer.decode([s], skip_special_tokens=False))
            else:
                out.append(str(s))
        return out

    def _request(self, prompt: list[int], body: dict[str, Any], n: int, kw: dict[str, Any],
                 request_id: str | None) -> CompletionRequest:
        return CompletionRequest(prompt=prompt, body=body, n=n, request_id=request_id or uuid.uuid4().hex,
                                 timeout=float(kw.get("http_timeout", self.http_timeout)), api=self.api,
                                 tokenizer=self.tokenizer)

    # ------------------------------------------------------------------ one logical request

    async def _run(self, request: CompletionRequest, headers: Mapping[str, str] | None
                   ) -> tuple[list[SampledCompletion], int]:
        """The `n` choices of one request, retried as a whole (a broken stream loses every choice);
        returns them and the number of attempts taken."""
        n = request.n
        last: AttemptFailed | None = None
        for index in range(self.policy.max_attempts):
            if last is not None and not last.reroute:
                await asyncio.sleep(self.policy.delay(index, last.retry_after))
            # One slot per sequence; the plain call keeps controllers written for one slot working.
            await (self.controller.acquire(weight=n) if n > 1 else self.controller.acquire())
            attempt = Attempt(request, index)
            metrics: ServerMetrics | None = None
            try:
                completions = await self._attempt(attempt, headers)
                metrics = completions[0].metrics if completions else None
                return completions, index + 1
            except AttemptFailed as exc:
                last = exc
                metrics = exc.metrics or ServerMetrics(request_id=request.request_id)
                metrics.retry_attempt = index
                metrics.error = f"{exc.kind}: {exc}"
                metrics.client_latency = time.monotonic() - attempt.started
                metrics.start_time = attempt.started
                log.debug("sampling_attempt_failed", request_id=request.request_id, attempt=index + 1,
                          kind=exc.kind, status=exc.status, error=str(exc))
                self._record(metrics)
                if exc.kind == "truncated":
                    metrics = None  # a truncated stream gives no trustworthy telemetry: release without it
            finally:
                if n > 1:
                    self.controller.release(metrics, weight=n)
                else:
                    self.controller.release(metrics)
        assert last is not None
        raise self._exhausted(last, request.request_id)

    def _exhausted(self, last: AttemptFailed, request_id: str) -> SamplingRequestError:
        timeout_like = last.kind == "timeout" or last.status in (408, 504)
        cls = DeploymentSamplerTimeoutError if timeout_like else SamplingRequestError
        attempts = self.policy.max_attempts
        message = (f"sampling request {request_id} failed after {attempts} attempts; last error "
                   f"({last.kind}{'' if last.status is None else f', HTTP {last.status}'}): {last}")
        if timeout_like:
            message += self._diagnostic()
        return cls(message, attempts=attempts, final_status=last.status, final_error_kind=last.kind,
                   request_id=request_id, retry_budget_exhausted=True)

    def _diagnostic(self) -> str:
        with self._metrics_lock:
            recent = list(self._metrics)[-256:]
        parts = []
        for name in ("prefill_queue_duration", "generation_queue_duration", "server_ttft"):
            vals = [getattr(m, name) for m in recent if getattr(m, name) is not None]
            if vals:
                parts.append(f"{name} p95={percentile(vals, 0.95):.3f}s")
        return f" (recent: {', '.join(parts)})" if parts else ""

    def _record(self, metrics: ServerMetrics) -> None:
        with self._metrics_lock:
            self._metrics.append(metrics)

    async def _fetch_replicas(self) -> list[str]:
        body = await request_json(await self._sessions.get(), "GET", self.base_url, timeout=10.0)
        return reachable_replica_urls(body if isinstance(body, dict) else {}, self.base_url)

    async def _attempt(self, attempt: Attempt, headers: Mapping[str, str] | None) -> list[SampledCompletion]:
        if self.routing is None:
            return await self._attempt_at(self.base_url, attempt, headers)
        replica = await self.routing.acquire()
        try:
            return await self._attempt_at(replica or self.base_url, attempt, headers)
        except AttemptFailed as exc:
            if replica is not None and exc.kind in ("transport", "truncated"):
                self.routing.failed(replica)  # gone or restarting: the gateway knows where to go
                exc.reroute = True
            raise
        finally:
            self.routing.release(replica)

    async def _attempt_at(self, base_url: str, attempt: Attempt,
                          extra_headers: Mapping[str, str] | None) -> list[SampledCompletion]:
        request = attempt.request
        session = await self._sessions.get()
        timeout = aiohttp.ClientTimeout(total=request.timeout, sock_connect=min(self.connect_timeout, request.timeout))
        headers = {**(extra_headers or {}), "x-request-id": request.request_id}
        for not_ready in range(self.not_ready_retries + 1):
            try:
                async with session.post(base_url + self.path, json=request.body, headers=headers,
                                        timeout=timeout) as resp:
                    if resp.status in NOT_READY_STATUSES and not_ready < self.not_ready_retries:
                        await resp.read()
                        log.info("deployment_not_ready", status=resp.status, request_id=request.request_id)
                        await asyncio.sleep(self.not_ready_delay)
                        continue
                    if resp.status >= 400:
                        raise await self._status_error(resp, attempt)
                    completions = await read_answer(resp, attempt)
                    # One record per attempt; with several choices it counts all their tokens.
                    first = completions[0].metrics
                    assert first is not None
                    record = first if request.n == 1 else dataclasses.replace(
                        first, completion_tokens=sum(c.completion_len for c in completions))
                    self._record(record)
                    return completions
            except TimeoutError as exc:
                raise AttemptFailed("timeout", f"no complete response within {request.timeout:.1f}s",
                                    metrics=ServerMetrics(request_id=request.request_id, transport_error=True)) from exc
            except aiohttp.ClientPayloadError as exc:
                raise AttemptFailed("truncated", f"stream broke off: {exc}") from exc
            except aiohttp.ClientError as exc:
                raise AttemptFailed("transport", f"{type(exc).__name__}: {exc}", metrics=ServerMetrics(
                    request_id=request.request_id, transport_error=True)) from exc
        raise NotFoundError(f"deployment at {self.base_url} still not ready after {self.not_ready_retries} waits")

    async def _status_error(self, resp: aiohttp.ClientResponse, attempt: Attempt) -> Exception:
        text = await resp.text()
        try:
            payload: Any = json.loads(text) if text else None
        except ValueError:
            payload = text
        metrics = parse_server_metrics(resp.headers, None, http_status_code=resp.status,
                                       request_id=attempt.request.request_id, retry_attempt=attempt.index,
                                       start_time=attempt.started)
        err: FiretitanError = from_response(resp.status, payload)
        if self.policy.retryable(resp.status):
            return AttemptFailed("http_status", err.message, status=resp.status, metrics=metrics,
                                 retry_after=parse_retry_after(resp.headers.get("Retry-After")))
        self._record(metrics)
        if resp.status in (400, 422) and not isinstance(err, InvalidRequestError):
            err = InvalidRequestError(err.message, field=err.field, status_code=resp.status, body=payload)
        return err


class _Closed:
    """An already-finished close (awaiting it returns at once)."""

    def __await__(self) -> Generator[None, None, None]:
        return
        yield
