"""One firetitan choice as one streamed vLLM `/v1/completions` request: body, chunk parsing, raw-logprob rescoring."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

from firetitan.errors import APIStatusError, InvalidRequestError
from firetitan.server.deployment.engine import SamplingOptions, StepOutput, TokenOut

_TOKEN_PREFIX = "token_id:"  # vLLM's return_tokens_as_token_ids spelling of a token in logprob lists


def is_model_distribution(opts: SamplingOptions) -> bool:
    """True when the sampled distribution is the model's own (then sampling_logprob == logprob exactly)."""
    return opts.temperature == 1.0 and opts.top_p >= 1.0 and opts.top_k <= 0


def vllm_body(served_name: str, prompt: list[int], opts: SamplingOptions, ignore_eos: bool) -> dict[str, Any]:
    """The streamed vLLM completion request for one choice (token ids in, token ids + logprobs out)."""
    return {
        "model": served_name, "prompt": prompt, "max_tokens": opts.max_tokens, "temperature": opts.temperature,
        "top_p": opts.top_p, "top_k": opts.top_k if opts.top_k > 0 else -1, "seed": opts.seed,
        "stop": list(opts.stop) or None, "stop_token_ids": sorted(opts.stop_token_ids) or None,
        "ignore_eos": ignore_eos, "logprobs": opts.top_logprobs, "return_token_ids": True,
        "return_tokens_as_token_ids": True, "stream": True, "stream_options": {"include_usage": True},
        "skip_special_tokens": True,
    }


def _token_id(text: str) -> int:
    if not text.startswith(_TOKEN_PREFIX):
        raise APIStatusError(f"vLLM returned a logprob token {text!r} without its id", status_code=502)
    return int(text[len(_TOKEN_PREFIX):])


def parse_chunk(choice: dict[str, Any], version: str, greedy: bool, top: int) -> list[TokenOut]:
    """The new tokens of one streamed vLLM choice delta, tagged with the policy version served now."""
    ids = choice.get("token_ids") or []
    lp = choice.get("logprobs") or {}
    values = lp.get("token_logprobs") or []
    tops = lp.get("top_logprobs") or []
    if len(values) != len(ids):
        raise APIStatusError(f"vLLM chunk has {len(ids)} token ids but {len(values)} logprobs", status_code=502)
    out = []
    for i, (token, value) in enumerate(zip(ids, values, strict=True)):
        alts = None
        if top and i < len(tops) and tops[i]:
            ranked = sorted(((_token_id(t), float(v)) for t, v in tops[i].items()), key=lambda tv: -tv[1])
            alts = ranked[:top]
        sampling = 0.0 if greedy else float(value)  # greedy picks with probability 1 (firetitan convention)
        out.append(TokenOut(int(token), float(value), sampling, version, alts))
    return out


async def _sse(resp: aiohttp.ClientResponse) -> AsyncIterator[dict[str, Any]]:
    async for raw in resp.content:
        # aiohttp hands out already-buffered lines without suspending, so a stream with a backlog held the
        # event loop until it drained: behind 8 nano streams, /health and a hot-load's pause waited 1-8 s.
        await asyncio.sleep(0)
        line = raw.strip()
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            return
        yield json.loads(data)


@dataclass
class ChoiceRun:
    """Arrival time and concurrency of one choice, for its perf_metrics."""

    arrival: float
    concurrent_at_arrival: int


async def stream_choice(session: aiohttp.ClientSession, url: str, body: dict[str, Any], opts: SamplingOptions,
                        version: Callable[[], str], run: ChoiceRun) -> AsyncIterator[StepOutput]:
    """Yield one StepOutput per vLLM chunk; the last carries finish_reason and perf_metrics from vLLM's timings."""
    greedy = opts.temperature == 0.0
    finish: str | None = None
    produced = 0
    async with session.post(f"{url}/v1/completions", json=body) as resp:
        if resp.status != 200:
            payload = await resp.text()
            if resp.status == 400:
                raise InvalidRequestError(f"vLLM refused the request: {payload[:500]}", field="prompt")
            raise APIStatusError(f"vLLM answered HTTP {resp.status}: {payload[:500]}", status_code=502)
        async for chunk in _sse(resp):
            if "error" in chunk:
                raise APIStatusError(f"vLLM stream failed: {chunk['error']}", status_code=502)
            for choice in chunk.get("choices") or []:
                tokens = parse_chunk(choice, version(), greedy, opts.top_logprobs)
                produced += len(tokens)
                finish = choice.get("finish_reason") or finish
                if tokens or choice.get("text"):
                    yield StepOutput(tokens, choice.get("text") or "")
            if chunk.get("usage") is not None:
                metrics = perf_metrics(chunk, run, produced)
                yield StepOutput([], "", finish or "length", metrics)
                return
    yield StepOutput([], "", finish or "length", perf_metrics({}, run, produced))


def perf_metrics(chunk: dict[str, Any], run: ChoiceRun, produced: int) -> dict[str, Any]:
    """Fireworks perf_metrics from vLLM's per-request timings (`--enable-per-request-metrics`)."""
    usage = chunk.get("usage") or {}
    m = chunk.get("metrics") or {}
    queue = (m.get("queue_time_ms") or 0.0) / 1000
    out: dict[str, Any] = {
        "num-concurrent-requests": run.concurrent_at_arrival,
        "prompt-tokens": usage.get("prompt_tokens"),
        "cached-prompt-tokens": ((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0),
        "completion-tokens": produced,
        "server-processing-time": round(time.monotonic() - run.arrival, 6),
        "backend": "vllm",
    }
    if m.get("queue_time_ms") is not None:
        out["prefill-queue-duration"] = round(queue, 6)
    if m.get("time_to_first_token_ms") is not None:  # vLLM counts it from scheduling, firetitan from arrival
        out["server-time-to-first-token"] = round(queue + m["time_to_first_token_ms"] / 1000, 6)
        out["prefill-duration"] = round(m["time_to_first_token_ms"] / 1000, 6)
    if m.get("generation_time_ms") is not None:
        out["generation-duration"] = round(m["generation_time_ms"] / 1000, 6)
    return out


async def rescore(session: aiohttp.ClientSession, url: str, served_name: str, prompt: list[int],
                  tokens: list[TokenOut]) -> None:
    """Set each token's `logprob` to the untempered model logprob (one prefill of prompt + completion).

    vLLM reports one logprob per token, from the distribution it sampled (processed_logprobs); when that
    is not the model's own distribution, the model's logprobs come from prompt_logprobs, which vLLM
    computes from the raw logits.
    """
    if not tokens:
        return
    ids = [*prompt, *(t.token_id for t in tokens)]
    body = {"model": served_name, "prompt": ids, "max_tokens": 1, "temperature": 0.0, "prompt_logprobs": 0}
    async with session.post(f"{url}/v1/completions", json=body) as resp:
        payload = await resp.json()
        if resp.status != 200:
            raise APIStatusError(f"vLLM rescoring answered HTTP {resp.status}: {payload}", status_code=502)
    rows = payload["choices"][0]["prompt_logprobs"]
    for i, token in enumerate(tokens):
        row = rows[len(prompt) + i] or {}
        entry = row.get(str(token.token_id))
        if entry is None:
            raise APIStatusError(f"vLLM prompt_logprobs lack token {token.token_id} at {len(prompt) + i}",
                                 status_code=502)
        token.logprob = float(entry["logprob"])
