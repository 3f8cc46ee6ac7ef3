"""The completions wire, read side: SSE events and JSON answers folded per choice into `SampledCompletion`s.

Contract (docs/contracts.md, "Completions"): intermediate stream chunks carry text and logprobs;
the chunk that finishes a choice (the one with its `finish_reason`) carries that choice's complete
`raw_output` = {prompt_token_ids, completion_token_ids, policy_versions (one per completion token)}.
A JSON answer is one such final chunk holding every choice. The complete `raw_output` is taken as
it is, never summed from pieces: a reader that kept only the last piece would silently misalign
tokens and logprobs.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import AsyncIterator
from typing import Any, Literal

import aiohttp

from firetitan.client.sampled import SampledCompletion
from firetitan.client.server_metrics import ServerMetrics, parse_server_metrics
from firetitan.logging import get_logger

log = get_logger("firetitan.client.completion_wire")

ApiStyle = Literal["fireworks", "openai"]
VALID_FINISH_REASONS = frozenset({"stop", "length", "tool_calls"})


class AttemptFailed(Exception):
    """One attempt failed in a way worth retrying; `kind` names how (timeout, transport, truncated, ...)."""

    def __init__(self, kind: str, message: str, *, status: int | None = None,
                 retry_after: float | None = None, metrics: ServerMetrics | None = None,
                 reroute: bool = False) -> None:
        super().__init__(message)
        self.kind = kind
        self.status = status
        self.retry_after = retry_after
        self.metrics = metrics
        self.reroute = reroute  # a direct replica failed: retry at once elsewhere, no backoff


@dataclasses.dataclass(frozen=True)
class CompletionRequest:
    """One logical request (one HTTP body, `n` choices), shared by all its attempts."""

    prompt: list[int]
    body: dict[str, Any]
    n: int
    request_id: str
    timeout: float
    api: ApiStyle = "fireworks"
    tokenizer: Any = None

    @property
    def temperature(self) -> float:
        return float(self.body.get("temperature", 1.0))

    @property
    def wants_logprobs(self) -> bool:
        return bool(self.body.get("logprobs"))

    @property
    def echo(self) -> bool:
        return bool(self.body.get("echo"))

    @property
    def streamed(self) -> bool:
        return bool(self.body.get("stream"))


@dataclasses.dataclass
class Attempt:
    """One try at a `CompletionRequest`: its 0-based index and when it started."""

    request: CompletionRequest
    index: int
    started: float = dataclasses.field(default_factory=time.monotonic)
    first_token_at: float | None = None


async def read_answer(resp: aiohttp.ClientResponse, attempt: Attempt) -> list[SampledCompletion]:
    """The completions of a 2xx answer, streamed or JSON, or `AttemptFailed`."""
    if attempt.request.streamed:
        return await _read_stream(resp, attempt)
    return await _read_json(resp, attempt)


async def _read_json(resp: aiohttp.ClientResponse, attempt: Attempt) -> list[SampledCompletion]:
    text = await resp.text()  # a body cut short raises ClientPayloadError: "truncated", retried
    try:
        payload = json.loads(text)
    except ValueError as exc:
        raise AttemptFailed("upstream_error", f"undecodable response body: {text[:200]!r}") from exc
    if not isinstance(payload, dict) or "choices" not in payload:
        raise AttemptFailed("upstream_error", f"response has no choices: {text[:300]!r}")
    readers = [ChoiceReader(i) for i in range(attempt.request.n)]
    perf = _fold(payload, readers)
    return _build_all(readers, resp, attempt, perf)


async def _read_stream(resp: aiohttp.ClientResponse, attempt: Attempt) -> list[SampledCompletion]:
    readers = [ChoiceReader(i) for i in range(attempt.request.n)]
    perf: _RequestFields = _RequestFields()
    done = False
    async for event, data in sse_events(resp.content):
        if data == "[DONE]":
            done = True
            break
        try:
            chunk = json.loads(data)
        except ValueError as exc:
            raise AttemptFailed("upstream_error", f"undecodable SSE data: {data[:200]!r}") from exc
        if event == "error" or (isinstance(chunk, dict) and "error" in chunk and "choices" not in chunk):
            raise _error_event(chunk, resp, attempt)
        if attempt.first_token_at is None and _has_content(chunk):
            attempt.first_token_at = time.monotonic()
        perf = _fold(chunk, readers, perf)
    if not done:
        raise AttemptFailed("truncated", "stream ended without [DONE]")
    return _build_all(readers, resp, attempt, perf)


def _error_event(chunk: Any, resp: aiohttp.ClientResponse, attempt: Attempt) -> AttemptFailed:
    err = chunk.get("error") if isinstance(chunk, dict) else None
    status = None
    if isinstance(err, dict):
        status = err.get("code") if isinstance(err.get("code"), int) else err.get("status")
    status = status if isinstance(status, int) else 500
    metrics = parse_server_metrics(resp.headers, None, http_status_code=status,
                                   request_id=attempt.request.request_id)
    return AttemptFailed("upstream_error", f"upstream error event: {str(err)[:300]}", status=status,
                         metrics=metrics)


def _has_content(chunk: Any) -> bool:
    return isinstance(chunk, dict) and any(c.get("text") or (c.get("raw_output") or {}).get(
        "completion_token_ids") for c in chunk.get("choices") or [])


@dataclasses.dataclass
class _RequestFields:
    """Chunk-level fields: they describe the whole request, not one choice."""

    perf_metrics: dict[str, Any] | None = None
    usage: dict[str, Any] | None = None
    prompt_ids: list[int] | None = None


def _fold(chunk: dict[str, Any], readers: list[ChoiceReader],
          fields: _RequestFields | None = None) -> _RequestFields:
    """Hand each choice of a chunk to its own reader; keep the chunk-level fields."""
    fields = fields or _RequestFields()
    if isinstance(chunk.get("perf_metrics"), dict):
        fields.perf_metrics = chunk["perf_metrics"]
    if isinstance(chunk.get("usage"), dict):
        fields.usage = chunk["usage"]
    if chunk.get("prompt_token_ids"):
        fields.prompt_ids = [int(t) for t in chunk["prompt_token_ids"]]
    for choice in chunk.get("choices") or []:
        index = choice.get("index", 0)
        if isinstance(index, int) and 0 <= index < len(readers):
            readers[index].add(choice)
    return fields


class ChoiceReader:
    """One choice's text and logprob rows as they stream, and its final, complete `raw_output`."""

    def __init__(self, index: int = 0) -> None:
        self.index = index
        self.text: list[str] = []
        self.raw: dict[str, Any] | None = None
        self.logprobs: list[float | None] = []
        self.sampling_logprobs: list[float | None] = []
        self.entry_versions: list[str | None] = []
        self.top: list[list[tuple[int, float]] | None] = []
        self.version: str | None = None
        self.finish_reason: str | None = None

    def add(self, choice: dict[str, Any]) -> None:
        if choice.get("text"):
            self.text.append(choice["text"])
        raw = choice.get("raw_output")
        if isinstance(raw, dict) and raw.get("completion_token_ids") is not None:
            self.raw = raw  # complete by contract: the last one seen is the whole choice
        lp = choice.get("logprobs")
        if isinstance(lp, dict):
            for entry in lp.get("content") or []:
                self.logprobs.append(entry.get("logprob"))
                self.sampling_logprobs.append(entry.get("sampling_logprob"))
                pv = entry.get("policy_version")
                self.entry_versions.append(None if pv is None else str(pv))
                self.top.append(_top_row(entry.get("top_logprobs")))
        if choice.get("policy_version") is not None:
            self.version = str(choice["policy_version"])
        if choice.get("finish_reason"):
            self.finish_reason = choice["finish_reason"]

    def build(self, request: CompletionRequest, fields: _RequestFields, metrics: ServerMetrics) -> SampledCompletion:
        raw = self.raw or {}
        if self.raw is None:
            if request.api == "fireworks":
                raise AttemptFailed("upstream_error", "response has no raw_output.completion_token_ids")
            # OpenAI-compatible servers return text only; re-tokenise when we can.
            ids = (list(request.tokenizer.encode("".join(self.text), add_special_tokens=False))
                   if request.tokenizer is not None else [])
        else:
            ids = [int(t) for t in raw["completion_token_ids"]]
        prompt_ids = ([int(t) for t in raw["prompt_token_ids"]] if raw.get("prompt_token_ids")
                      else fields.prompt_ids or request.prompt)
        inference = sampling = None
        top = [row for row in self.top] if request.wants_logprobs and self.top else None
        versions = [str(v) for v in raw.get("policy_versions") or []] or None
        if request.wants_logprobs and self.logprobs:
            inference = self.logprobs
            sampling = self.sampling_logprobs
        echoed = 0
        if request.echo:
            ids, inference, sampling, top, echoed = _strip_echo(prompt_ids, ids, inference, sampling, top)
        inference_f = _floats(inference)
        sampling_f = _floats(sampling)
        if sampling_f is None and inference_f is not None and request.temperature == 1.0:
            log.warning("sampling_logprobs_missing_using_raw")
            sampling_f = list(inference_f)
        if versions is None and any(v is not None for v in self.entry_versions):
            versions = [str(v) for v in self.entry_versions[-len(ids):] if v is not None] or None
        completion_len = len(ids)
        if self.raw is None and fields.usage and fields.usage.get("completion_tokens") is not None:
            completion_len = int(fields.usage["completion_tokens"])
        metrics.completion_tokens = completion_len
        topk_ids = topk_lps = None
        if top is not None and all(row is not None for row in top):
            topk_ids = [[t for t, _ in row] for row in top]  # type: ignore[union-attr]
            topk_lps = [[lp for _, lp in row] for row in top]  # type: ignore[union-attr]
        return SampledCompletion(
            text="".join(self.text), full_tokens=list(prompt_ids) + ids, prompt_len=len(prompt_ids),
            finish_reason=self.finish_reason or "", completion_len=completion_len,
            inference_logprobs=inference_f, sampling_logprobs=sampling_f,
            logprobs_echoed=request.echo and (inference_f is not None or sampling_f is not None),
            echoed_prompt_logprob_count=echoed, inference_topk_token_ids=topk_ids, inference_topk_logprobs=topk_lps,
            policy_version=self.version or (versions[-1] if versions else None), policy_versions=versions,
            metrics=metrics)


def _top_row(candidates: Any) -> list[tuple[int, float]] | None:
    if not isinstance(candidates, list) or not candidates:
        return None
    row = []
    for c in candidates:
        if not isinstance(c, dict) or not isinstance(c.get("token_id"), int) or c.get("logprob") is None:
            return None
        row.append((int(c["token_id"]), float(c["logprob"])))
    return row


def _floats(values: list[float | None] | None) -> list[float] | None:
    if not values or any(v is None for v in values):
        return None
    return [float(v) for v in values]  # type: ignore[arg-type]


def _strip_echo(prompt: list[int], ids: list[int], inference: list[float | None] | None,
                sampling: list[float | None] | None, top: list[Any] | None
                ) -> tuple[list[int], Any, Any, Any, int]:
    """With `echo`, the answer holds the P prompt tokens, then the C completion tokens, with logprob
    rows for all P+C. Keep the completion ids and the P+C-1 rows that score a token given its
    prefix (the first prompt token has no prefix): the rows a trainer forward produces."""
    p = len(prompt)
    if ids[:p] != prompt:
        raise AttemptFailed("upstream_error", "echoed tokens do not start with the prompt token ids")
    for rows in (inference, sampling, top):
        if rows is not None and len(rows) != len(ids):
            raise AttemptFailed("upstream_error", f"echo: {len(rows)} logprob rows for {len(ids)} token ids")
    drop = 1 if p else 0

    def cut(rows: list[Any] | None) -> list[Any] | None:
        return None if rows is None else rows[drop:]

    return ids[p:], cut(inference), cut(sampling), cut(top), p - drop


def _build_all(readers: list[ChoiceReader], resp: aiohttp.ClientResponse, attempt: Attempt,
               fields: _RequestFields) -> list[SampledCompletion]:
    for reader in readers:
        if reader.finish_reason is None:
            raise AttemptFailed("truncated", f"the response ended without a finish_reason for choice {reader.index}")
        if reader.finish_reason not in VALID_FINISH_REASONS:
            raise AttemptFailed("upstream_error", f"unexpected finish_reason {reader.finish_reason!r}")
    ended = time.monotonic()
    first = attempt.first_token_at
    metrics = parse_server_metrics(resp.headers, fields.perf_metrics, http_status_code=resp.status,
                                   request_id=attempt.request.request_id, retry_attempt=attempt.index,
                                   start_time=attempt.started, client_latency=ended - attempt.started,
                                   client_ttft=None if first is None else first - attempt.started)
    # Each completion gets its own copy: build() writes its completion length into it.
    return [r.build(attempt.request, fields, metrics if i == 0 else dataclasses.replace(metrics))
            for i, r in enumerate(readers)]


async def sse_events(stream: aiohttp.StreamReader) -> AsyncIterator[tuple[str, str]]:
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
