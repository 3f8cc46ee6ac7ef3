"""`DeploymentSampler`: streaming completions from a deployment, gated by a concurrency controller, with retries."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import threading
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Sequence
from typing import Any, Literal

import aiohttp

from firetitan.client.concurrency import AdaptiveConcurrencyController, ConcurrencyController, percentile
from firetitan.client.metrics import ServerMetrics, parse_server_metrics
from firetitan.client.replicas import ReplicaRouting, reachable_replica_urls
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

log = get_logger("firetitan.client.sampling")

RETRYABLE_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
NOT_READY_STATUSES = frozenset({404, 425})
VALID_FINISH_REASONS = frozenset({"stop", "length", "tool_calls"})
# Consumed here, never sent to the server.
_CLIENT_ONLY_KWARGS = frozenset({"http_timeout", "sampling_context", "timeout_diagnostic_context"})
ApiStyle = Literal["fireworks", "openai"]
# "requests": `n` completions are `n` independent streaming requests (the hosted SDK's behaviour).
# "choices": one streaming request with `n` choices; the deployment prefills the prompt once and
# the stream, the HTTP handling and the retry are shared by the group.
FanOut = Literal["requests", "choices"]
MAX_CHOICES_PER_REQUEST = 128  # the deployment's limit on `n`; larger groups are split into requests


@dataclasses.dataclass
class SampledCompletion:
    """One completion, aligned for training: `full_tokens = prompt + completion`."""

    text: str
    full_tokens: list[int]
    prompt_len: int
    completion_len: int
    finish_reason: str
    inference_logprobs: list[float] | None = None
    sampling_logprobs: list[float] | None = None
    policy_version: str | None = None
    policy_versions: list[str] | None = None
    metrics: ServerMetrics | None = None

    @property
    def prompt_tokens(self) -> list[int]:
        return self.full_tokens[: self.prompt_len]

    @property
    def completion_tokens(self) -> list[int]:
        return self.full_tokens[self.prompt_len:]


class _AttemptFailed(Exception):
    """One attempt failed in a way worth retrying."""

    def __init__(self, kind: str, message: str, *, status: int | None = None,
                 retry_after: float | None = None, metrics: ServerMetrics | None = None,
                 reroute: bool = False) -> None:
        super().__init__(message)
        self.kind = kind
        self.status = status
        self.retry_after = retry_after
        self.metrics = metrics
        self.reroute = reroute  # a direct replica failed: retry at once elsewhere, no backoff


def backoff_delay(attempt: int, *, base: float, cap: float, retry_after: float | None = None,
                  rng: random.Random | None = None) -> float:
    """Sleep before retry number `attempt` (1-based): base*2^(attempt-1) capped, times U[0.5, 1.5),
    never shorter than the server's `Retry-After`."""
    r = (rng or random).random()
    delay = min(cap, base * (2 ** max(0, attempt - 1))) * (0.5 + r)
    if retry_after is not None:
        delay = max(delay, retry_after)
    return delay


def parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # HTTP-date form: rare for inference servers; fall back to our own backoff


class DeploymentSampler:
    """Samples completions from one deployment URL.

    `api="fireworks"` posts to `/inference/v1/completions` (token-id prompts, `raw_output`,
    `perf_metrics`); `api="openai"` posts to `/v1/completions` for any OpenAI-compatible server.
    With `direct_replicas=True`, `base_url` must be a firetitan deployment resource URL: requests go
    straight to its replicas when they are reachable (see `firetitan.client.replicas`).
    `fanout` picks how `n > 1` completions of one prompt are requested (see `FanOut`); either way
    the concurrency controller counts `n` slots, so its window is in sequences. `stream=False` asks
    for one JSON answer per request instead of a token stream: the same fields (token ids, logprobs,
    policy versions, perf metrics) at a fraction of the HTTP work, for callers that only use whole
    completions (RL rollouts); only the client-side time to first token is lost.
    """

    def __init__(self, base_url: str, tokenizer: Any = None,
                 concurrency_controller: ConcurrencyController | None = None, api_key: str | None = None,
                 model: str = "default", http_timeout: float = 600.0, max_attempts: int = 7, *,
                 api: ApiStyle = "fireworks", backoff_base: float = 2.0, backoff_max: float = 30.0,
                 not_ready_delay: float = 5.0, not_ready_retries: int = 10,
                 connect_timeout: float = 30.0, direct_replicas: bool = False,
                 replica_refresh_s: float = 10.0, fanout: FanOut = "requests", stream: bool = True) -> None:
        if max_attempts < 1:
            raise ConfigError(f"max_attempts must be >= 1, got {max_attempts}", field="max_attempts")
        if http_timeout <= 0:
            raise ConfigError(f"http_timeout must be > 0, got {http_timeout}", field="http_timeout")
        if api not in ("fireworks", "openai"):
            raise ConfigError(f"api must be 'fireworks' or 'openai', got {api!r}", field="api")
        if fanout not in ("requests", "choices"):
            raise ConfigError(f"fanout must be 'requests' or 'choices', got {fanout!r}", field="fanout")
        self.base_url = base_url.rstrip("/")
        self.tokenizer = tokenizer
        self.controller: ConcurrencyController = concurrency_controller or AdaptiveConcurrencyController()
        self.api_key = api_key
        self.model = model
        self.http_timeout = float(http_timeout)
        self.max_attempts = int(max_attempts)
        self.api: ApiStyle = api
        self.fanout: FanOut = fanout
        self.stream = bool(stream)
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.not_ready_delay = not_ready_delay
        self.not_ready_retries = not_ready_retries
        self.connect_timeout = connect_timeout
        self.routing = ReplicaRouting(self._fetch_replicas, refresh_s=replica_refresh_s) if direct_replicas else None
        self._metrics: list[ServerMetrics] = []
        self._metrics_lock = threading.Lock()
        self._sessions: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, aiohttp.ClientSession] = (
            weakref.WeakKeyDictionary())
        # Per loop, an async generator whose `finally` closes that loop's session when `asyncio.run`
        # shuts the loop's async generators down, so per-step loops never leak connections.
        self._keepers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Any] = weakref.WeakKeyDictionary()

    @property
    def concurrency_controller(self) -> ConcurrencyController:
        return self.controller

    @property
    def path(self) -> str:
        return "/inference/v1/completions" if self.api == "fireworks" else "/v1/completions"

    # ------------------------------------------------------------------ sessions

    async def _session(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        sess = self._sessions.get(loop)
        if sess is None or sess.closed:
            headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
            sess = aiohttp.ClientSession(headers=headers, connector=aiohttp.TCPConnector(limit=0))
            self._sessions[loop] = sess
            keeper = _close_on_loop_shutdown(sess)
            await keeper.__anext__()
            self._keepers[loop] = keeper
        return sess

    async def close(self) -> None:
        """Close this loop's HTTP session (sessions of other loops close when their loop shuts down)."""
        loop = asyncio.get_running_loop()
        if self.routing is not None:
            await self.routing.cancel_lookup(loop)
        sess = self._sessions.pop(loop, None)
        keeper = self._keepers.pop(loop, None)
        if keeper is not None:
            await keeper.aclose()
        elif sess is not None and not sess.closed:
            await sess.close()

    async def __aenter__(self) -> DeploymentSampler:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------------ public API

    async def sample_with_tokens(self, messages: Sequence[Any], n: int = 1, max_tokens: int = 256,
                                 temperature: float = 1.0, max_seq_len: int | None = None,
                                 **kw: Any) -> list[SampledCompletion]:
        """Apply the chat template to one conversation and sample `n` completions of it.

        A list of conversations is also accepted; their completions are returned in order.
        """
        if self.tokenizer is None:
            raise ConfigError("sample_with_tokens needs a tokenizer; pass tokenizer= to DeploymentSampler",
                              field="tokenizer")
        if messages and all(isinstance(m, list | tuple) for m in messages):
            groups = await asyncio.gather(*(self.sample_with_tokens(
                list(conv), n=n, max_tokens=max_tokens, temperature=temperature, max_seq_len=max_seq_len,
                **kw) for conv in messages))
            return [c for g in groups for c in g]
        prompt = self._apply_chat_template(list(messages))
        return await self.sample_with_prompt_tokens(prompt, n=n, max_tokens=max_tokens, temperature=temperature,
                                                    max_seq_len=max_seq_len, **kw)

    async def sample_with_prompt_tokens(self, prompt_tokens: Sequence[int], n: int = 1, max_tokens: int = 256,
                                        temperature: float = 1.0, max_seq_len: int | None = None,
                                        **kw: Any) -> list[SampledCompletion]:
        """Sample `n` completions of a token-id prompt: `n` streaming requests, or one with `n` choices."""
        prompt = [int(t) for t in prompt_tokens]
        if n < 1:
            raise InvalidRequestError(f"n must be >= 1, got {n}", field="n")
        if max_tokens < 1:
            raise InvalidRequestError(f"max_tokens must be >= 1, got {max_tokens}", field="max_tokens")
        if max_seq_len is not None and len(prompt) >= max_seq_len:
            log.warning("prompt_too_long", prompt_len=len(prompt), max_seq_len=max_seq_len)
            return []
        body = self._build_body(prompt, max_tokens=max_tokens, temperature=temperature, kw=kw)
        http_timeout = float(kw.get("http_timeout", self.http_timeout))
        if self.fanout == "choices":
            sizes = [min(MAX_CHOICES_PER_REQUEST, n - i) for i in range(0, n, MAX_CHOICES_PER_REQUEST)]
        else:
            sizes = [1] * n
        groups = await asyncio.gather(*(self._one_request(prompt, {**body, "n": k}, k, http_timeout, temperature)
                                        for k in sizes))
        results = [c for g in groups for c in g]
        if max_seq_len is not None:
            results = [r for r in results if len(r.full_tokens) <= max_seq_len]
        return list(results)

    def drain_metrics(self) -> list[ServerMetrics]:
        """Return and forget the metrics of every attempt since the last drain."""
        with self._metrics_lock:
            out, self._metrics = self._metrics, []
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

    def _build_body(self, prompt: list[int], *, max_tokens: int, temperature: float,
                    kw: dict[str, Any]) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "prompt": prompt, "n": 1, "max_tokens": int(max_tokens),
                                "temperature": float(temperature), "stream": self.stream}
        if self.api == "fireworks":
            body.update(perf_metrics_in_response=True, raw_output=True, top_p=1.0, top_k=0)
        elif self.stream:
            body.update(stream_options={"include_usage": True})
        for key, value in kw.items():
            if key not in _CLIENT_ONLY_KWARGS:
                body[key] = value
        stop = body.get("stop")
        if stop is not None:
            body["stop"] = self._stop_strings(stop)
        return body

    def _stop_strings(self, stop: Any) -> list[str]:
        items = stop if isinstance(stop, list | tuple) else [stop]
        out: list[str] = []
        for s in items:
            if isinstance(s, int):
                if self.tokenizer is None:
                    raise InvalidRequestError("integer stop ids need a tokenizer to decode them", field="stop")
                out.append(self.tokenizer.decode([s]))
            else:
                out.append(str(s))
        return out

    # ------------------------------------------------------------------ one logical request

    async def _one_request(self, prompt: list[int], body: dict[str, Any], n: int, http_timeout: float,
                           temperature: float) -> list[SampledCompletion]:
        """The `n` choices of one request, retried as a whole (a broken stream loses every choice)."""
        request_id = uuid.uuid4().hex
        last: _AttemptFailed | None = None
        for attempt in range(self.max_attempts):
            if last is not None and not last.reroute:
                await asyncio.sleep(backoff_delay(attempt, base=self.backoff_base, cap=self.backoff_max,
                                                  retry_after=last.retry_after))
            # One slot per sequence; the plain call keeps controllers written for one slot working.
            await (self.controller.acquire(n) if n > 1 else self.controller.acquire())
            metrics: ServerMetrics | None = None
            started = time.monotonic()
            try:
                completions = await self._attempt(prompt, body, n, request_id, attempt, http_timeout,
                                                  temperature)
                metrics = completions[0].metrics
                return completions
            except _AttemptFailed as exc:
                last = exc
                metrics = exc.metrics or ServerMetrics(request_id=request_id)
                metrics.retry_attempt = attempt
                metrics.error = f"{exc.kind}: {exc}"
                metrics.client_latency = time.monotonic() - started
                metrics.start_time = started
                log.debug("sampling_attempt_failed", request_id=request_id, attempt=attempt + 1,
                          kind=exc.kind, status=exc.status, error=str(exc))
                # A truncated stream gives no trustworthy telemetry: release without an observation.
                if exc.kind == "truncated":
                    self._record(metrics)
                    metrics = None
                    continue
                self._record(metrics)
            finally:
                if n > 1:
                    self.controller.release(metrics, n)
                else:
                    self.controller.release(metrics)
        assert last is not None
        raise self._exhausted(last, request_id)

    def _exhausted(self, last: _AttemptFailed, request_id: str) -> SamplingRequestError:
        timeout_like = last.kind == "timeout" or last.status in (408, 504)
        cls = DeploymentSamplerTimeoutError if timeout_like else SamplingRequestError
        message = (f"sampling request {request_id} failed after {self.max_attempts} attempts; last error "
                   f"({last.kind}{'' if last.status is None else f', HTTP {last.status}'}): {last}")
        if timeout_like:
            message += self._diagnostic()
        return cls(message, attempts=self.max_attempts, final_status=last.status, final_error_kind=last.kind,
                   request_id=request_id, retry_budget_exhausted=True)

    def _diagnostic(self) -> str:
        with self._metrics_lock:
            recent = self._metrics[-256:]
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
        session = await self._session()
        async with session.get(self.base_url, timeout=aiohttp.ClientTimeout(total=10.0)) as resp:
            if resp.status != 200:
                raise SamplingRequestError(f"replica lookup at {self.base_url} answered HTTP {resp.status}")
            return reachable_replica_urls(await resp.json(), self.base_url)

    async def _attempt(self, prompt: list[int], body: dict[str, Any], n: int, request_id: str, attempt: int,
                       http_timeout: float, temperature: float) -> list[SampledCompletion]:
        if self.routing is None:
            return await self._attempt_at(self.base_url, prompt, body, n, request_id, attempt, http_timeout,
                                          temperature)
        replica = await self.routing.acquire()
        try:
            return await self._attempt_at(replica or self.base_url, prompt, body, n, request_id, attempt,
                                          http_timeout, temperature)
        except _AttemptFailed as exc:
            if replica is not None and exc.kind in ("transport", "truncated"):
                self.routing.failed(replica)  # gone or restarting: the gateway knows where to go
                exc.reroute = True
            raise
        finally:
            self.routing.release(replica)

    async def _attempt_at(self, base_url: str, prompt: list[int], body: dict[str, Any], n: int, request_id: str,
                          attempt: int, http_timeout: float, temperature: float) -> list[SampledCompletion]:
        session = await self._session()
        timeout = aiohttp.ClientTimeout(total=http_timeout, sock_connect=min(self.connect_timeout, http_timeout))
        url = base_url + self.path
        headers = {"x-request-id": request_id}
        started = time.monotonic()
        for not_ready in range(self.not_ready_retries + 1):
            try:
                async with session.post(url, json=body, headers=headers, timeout=timeout) as resp:
                    if resp.status in NOT_READY_STATUSES and not_ready < self.not_ready_retries:
                        await resp.read()
                        log.info("deployment_not_ready", status=resp.status, request_id=request_id)
                        await asyncio.sleep(self.not_ready_delay)
                        continue
                    if resp.status >= 400:
                        raise await self._status_error(resp, request_id, attempt, started)
                    read = self._read_stream if body.get("stream") else self._read_json
                    completions = await read(resp, prompt, n, request_id, attempt, started, temperature,
                                             wants_logprobs=bool(body.get("logprobs")))
                    first = completions[0].metrics
                    assert first is not None
                    # One record per attempt; with several choices it counts all their tokens.
                    self._record(first if n == 1 else dataclasses.replace(
                        first, completion_tokens=sum(c.completion_len for c in completions)))
                    return completions
            except TimeoutError as exc:
                raise _AttemptFailed("timeout", f"no complete response within {http_timeout:.1f}s",
                                     metrics=ServerMetrics(request_id=request_id, transport_error=True)) from exc
            except aiohttp.ClientPayloadError as exc:
                raise _AttemptFailed("truncated", f"stream broke off: {exc}") from exc
            except aiohttp.ClientError as exc:
                raise _AttemptFailed("transport", f"{type(exc).__name__}: {exc}",
                                     metrics=ServerMetrics(request_id=request_id, transport_error=True)) from exc
        raise NotFoundError(f"deployment at {self.base_url} still not ready after {self.not_ready_retries} waits")

    async def _status_error(self, resp: aiohttp.ClientResponse, request_id: str, attempt: int,
                            started: float) -> Exception:
        text = await resp.text()
        try:
            payload: Any = json.loads(text) if text else None
        except ValueError:
            payload = text
        metrics = parse_server_metrics(resp.headers, None, http_status_code=resp.status, request_id=request_id,
                                       retry_attempt=attempt, start_time=started)
        if resp.status in RETRYABLE_STATUSES:
            message = from_response(resp.status, payload).message
            return _AttemptFailed("http_status", message, status=resp.status, metrics=metrics,
                                  retry_after=parse_retry_after(resp.headers.get("Retry-After")))
        self._record(metrics)
        err: FiretitanError = from_response(resp.status, payload)
        if resp.status in (400, 422) and not isinstance(err, InvalidRequestError):
            err = InvalidRequestError(err.message, field=err.field, status_code=resp.status, body=payload)
        return err

    # ------------------------------------------------------------------ stream parsing

    async def _read_json(self, resp: aiohttp.ClientResponse, prompt: list[int], n: int, request_id: str,
                         attempt: int, started: float, temperature: float, *,
                         wants_logprobs: bool) -> list[SampledCompletion]:
        """A non-streamed answer: the whole response has the shape of one chunk holding every choice."""
        text = await resp.text()  # a body cut short raises ClientPayloadError: "truncated", retried
        try:
            payload = json.loads(text)
        except ValueError as exc:
            raise _AttemptFailed("upstream_error", f"undecodable response body: {text[:200]!r}") from exc
        if not isinstance(payload, dict) or "choices" not in payload:
            raise _AttemptFailed("upstream_error", f"response has no choices: {text[:300]!r}")
        accs = [_StreamAccumulator(index) for index in range(n)]
        _fold(payload, accs)
        return self._build_all(accs, resp, prompt, request_id, attempt, started, None, temperature, wants_logprobs)

    async def _read_stream(self, resp: aiohttp.ClientResponse, prompt: list[int], n: int, request_id: str,
                           attempt: int, started: float, temperature: float, *,
                           wants_logprobs: bool) -> list[SampledCompletion]:
        accs = [_StreamAccumulator(index) for index in range(n)]
        first_at: float | None = None
        done = False
        async for event, data in _sse_events(resp.content):
            if data == "[DONE]":
                done = True
                break
            try:
                chunk = json.loads(data)
            except ValueError as exc:
                raise _AttemptFailed("upstream_error", f"undecodable SSE data: {data[:200]!r}") from exc
            if event == "error" or (isinstance(chunk, dict) and "error" in chunk and "choices" not in chunk):
                err = chunk.get("error") if isinstance(chunk, dict) else None
                status = None
                if isinstance(err, dict):
                    status = err.get("code") if isinstance(err.get("code"), int) else err.get("status")
                status = status if isinstance(status, int) else 500
                metrics = parse_server_metrics(resp.headers, None, http_status_code=status, request_id=request_id)
                raise _AttemptFailed("upstream_error", f"upstream error event: {str(err)[:300]}", status=status,
                                     metrics=metrics)
            if first_at is None and _StreamAccumulator.has_content(chunk):
                first_at = time.monotonic()
            _fold(chunk, accs)
        if not done:
            raise _AttemptFailed("truncated", "stream ended without [DONE]")
        return self._build_all(accs, resp, prompt, request_id, attempt, started, first_at, temperature,
                               wants_logprobs)

    def _build_all(self, accs: list[_StreamAccumulator], resp: aiohttp.ClientResponse, prompt: list[int],
                   request_id: str, attempt: int, started: float, first_at: float | None, temperature: float,
                   wants_logprobs: bool) -> list[SampledCompletion]:
        for acc in accs:
            if acc.finish_reason is None:
                raise _AttemptFailed("truncated", f"the response ended without a finish_reason for choice {acc.index}")
            if acc.finish_reason not in VALID_FINISH_REASONS:
                raise _AttemptFailed("upstream_error", f"unexpected finish_reason {acc.finish_reason!r}")
        ended = time.monotonic()
        # Chunk-level fields (perf_metrics, usage) reach every accumulator; they describe the request.
        metrics = parse_server_metrics(resp.headers, accs[0].perf_metrics, http_status_code=resp.status,
                                       request_id=request_id, retry_attempt=attempt, start_time=started,
                                       client_latency=ended - started,
                                       client_ttft=None if first_at is None else first_at - started)
        # Each completion gets its own copy: build() writes its completion length into it.
        return [acc.build(prompt, metrics if i == 0 else dataclasses.replace(metrics), self.api, self.tokenizer,
                          temperature, wants_logprobs) for i, acc in enumerate(accs)]


class _StreamAccumulator:
    """Folds SSE chunks of one choice (`index`) into a completion."""

    def __init__(self, index: int = 0) -> None:
        self.index = index
        self.text: list[str] = []
        self.token_ids: list[int] = []
        self.saw_token_ids = False
        self.prompt_ids: list[int] | None = None
        self.logprobs: list[float | None] = []
        self.sampling_logprobs: list[float | None] = []
        self.versions: list[str] = []
        self.version: str | None = None
        self.finish_reason: str | None = None
        self.perf_metrics: dict[str, Any] | None = None
        self.usage: dict[str, Any] | None = None

    @staticmethod
    def has_content(chunk: Any) -> bool:
        return isinstance(chunk, dict) and any(c.get("text") or (c.get("raw_output") or {}).get(
            "completion_token_ids") for c in chunk.get("choices") or [])

    def add_chunk_fields(self, chunk: dict[str, Any], prompt_ids: list[int] | None) -> None:
        if isinstance(chunk.get("perf_metrics"), dict):
            self.perf_metrics = chunk["perf_metrics"]
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
        if prompt_ids:
            self.prompt_ids = prompt_ids

    def add_choice(self, choice: dict[str, Any]) -> None:
        if choice.get("text"):
            self.text.append(choice["text"])
        raw = choice.get("raw_output") or {}
        if raw.get("completion_token_ids") is not None:
            self.saw_token_ids = True
            self.token_ids.extend(int(t) for t in raw["completion_token_ids"])
        if raw.get("prompt_token_ids"):
            self.prompt_ids = [int(t) for t in raw["prompt_token_ids"]]
        if raw.get("policy_versions"):
            self.versions.extend(str(v) for v in raw["policy_versions"])
        lp = choice.get("logprobs")
        if isinstance(lp, dict):
            for entry in lp.get("content") or []:
                self.logprobs.append(entry.get("logprob"))
                self.sampling_logprobs.append(entry.get("sampling_logprob"))
                if entry.get("policy_version") is not None and not raw.get("policy_versions"):
                    self.versions.append(str(entry["policy_version"]))
        if choice.get("policy_version") is not None:
            self.version = str(choice["policy_version"])
        if choice.get("finish_reason"):
            self.finish_reason = choice["finish_reason"]

    def build(self, prompt: list[int], metrics: ServerMetrics, api: ApiStyle, tokenizer: Any,
              temperature: float, wants_logprobs: bool) -> SampledCompletion:
        if not self.saw_token_ids:
            if api == "fireworks":
                raise _AttemptFailed("upstream_error", "response has no raw_output.completion_token_ids")
            # OpenAI-compatible servers return text only; re-tokenise when we can.
            if tokenizer is not None:
                self.token_ids = list(tokenizer.encode("".join(self.text), add_special_tokens=False))
        prompt_ids = self.prompt_ids or prompt
        completion_len = len(self.token_ids)
        if not self.saw_token_ids and self.usage and self.usage.get("completion_tokens") is not None:
            completion_len = int(self.usage["completion_tokens"])
        metrics.completion_tokens = completion_len
        inference = sampling = None
        if self.logprobs and wants_logprobs:
            if all(v is not None for v in self.logprobs):
                inference = [float(v) for v in self.logprobs]  # type: ignore[arg-type]
            if all(v is not None for v in self.sampling_logprobs):
                sampling = [float(v) for v in self.sampling_logprobs]  # type: ignore[arg-type]
            elif inference is not None and temperature == 1.0:
                log.warning("sampling_logprobs_missing_using_raw")
                sampling = list(inference)
        versions = self.versions or None
        version = self.version or (versions[-1] if versions else None)
        return SampledCompletion(text="".join(self.text), full_tokens=list(prompt_ids) + self.token_ids,
                                 prompt_len=len(prompt_ids), completion_len=completion_len,
                                 finish_reason=self.finish_reason or "", inference_logprobs=inference,
                                 sampling_logprobs=sampling, policy_version=version, policy_versions=versions,
                                 metrics=metrics)


def _fold(chunk: dict[str, Any], accs: list[_StreamAccumulator]) -> None:
    """Hand each choice of a chunk to its own accumulator; chunk-level fields describe the request."""
    prompt_ids = [int(t) for t in chunk["prompt_token_ids"]] if chunk.get("prompt_token_ids") else None
    for acc in accs:
        acc.add_chunk_fields(chunk, prompt_ids)
    for choice in chunk.get("choices") or []:
        index = choice.get("index", 0)
        if isinstance(index, int) and 0 <= index < len(accs):
            accs[index].add_choice(choice)


async def _sse_events(stream: aiohttp.StreamReader) -> AsyncIterator[tuple[str, str]]:
    """Yield (event, data) per SSE event; reads raw chunks so long `data:` lines have no size limit."""
    buf = b""
    event, data_lines = "message", []
    async for chunk in stream.iter_any():
        buf += chunk
        while True:
            nl = buf.find(b"\n")
            if nl < 0:
                break
            line, buf = buf[:nl].rstrip(b"\r").decode(), buf[nl + 1:]
            if not line:
                if data_lines:
                    yield event, "\n".join(data_lines)
                event, data_lines = "message", []
            elif line.startswith("data:"):
                data_lines.append(line[5:].lstrip(" "))
            elif line.startswith("event:"):
                event = line[6:].strip()
    if data_lines:
        yield event, "\n".join(data_lines)


async def _close_on_loop_shutdown(session: aiohttp.ClientSession) -> AsyncIterator[None]:
    try:
        yield
    finally:
        if not session.closed:
            await session.close()
