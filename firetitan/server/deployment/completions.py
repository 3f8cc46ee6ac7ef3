"""Completion request validation and Fireworks/OpenAI response shaping (no HTTP, no engine)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from firetitan.errors import InvalidRequestError
from firetitan.server.deployment.engine.request import SamplingOptions, StepOutput, TokenOut
from firetitan.server.deployment.schemas import CompletionBody

# perf_metrics keys that also travel as `fireworks-<key>` response headers.
HEADER_KEYS = ("prefill-queue-duration", "generation-queue-duration", "server-time-to-first-token",
               "num-concurrent-requests", "prompt-tokens", "cached-prompt-tokens", "server-processing-time",
               "prefill-duration", "generation-duration")


@dataclass(frozen=True)
class Limits:
    vocab_size: int
    max_positions: int
    max_cached_tokens: int
    max_choices: int = 128  # prompts x n in one request


@dataclass
class ParsedCompletion:
    prompts: list[list[int]]
    options: list[SamplingOptions]  # one per prompt (max_tokens clamped to fit the context)
    n: int
    want_logprobs: bool
    top_logprobs: int


def _token_list(value: Any, where: str, vocab: int) -> list[int]:
    if not value:
        raise InvalidRequestError(f"{where} is empty; give at least one token", field="prompt")
    out = []
    for i, tok in enumerate(value):
        if isinstance(tok, bool) or not isinstance(tok, int):
            raise InvalidRequestError(f"{where}[{i}] = {tok!r} is not an integer token id", field="prompt")
        if not 0 <= tok < vocab:
            raise InvalidRequestError(f"{where}[{i}] = {tok} is outside the vocabulary [0, {vocab})", field="prompt")
        out.append(tok)
    return out


def _checked_encode(encode: Callable[[str], list[int]], text: str, where: str) -> list[int]:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate (valid JSON, not valid text)
        raise InvalidRequestError(f"{where} is not valid Unicode text ({exc.reason} at {exc.start})",
                                  field="prompt") from None
    return encode(text)


def parse_prompts(prompt: Any, encode: Callable[[str], list[int]], vocab: int) -> list[list[int]]:
    """Token ids, text, or a list of either → one token list per prompt."""
    if isinstance(prompt, str):
        return [_token_list(_checked_encode(encode, prompt, "prompt"), "prompt (tokenized)", vocab)]
    if not isinstance(prompt, list) or not prompt:
        raise InvalidRequestError("prompt must be a non-empty list of token ids, a string, or a list of those",
                                  field="prompt")
    if all(isinstance(p, str) for p in prompt):
        return [_token_list(_checked_encode(encode, p, f"prompt[{i}]"), f"prompt[{i}] (tokenized)", vocab)
                for i, p in enumerate(prompt)]
    if all(isinstance(p, list) for p in prompt):
        return [_token_list(p, f"prompt[{i}]", vocab) for i, p in enumerate(prompt)]
    return [_token_list(prompt, "prompt", vocab)]


def parse_completion(body: CompletionBody, encode: Callable[[str], list[int]], limits: Limits) -> ParsedCompletion:
    if isinstance(body.prompt, list) and len(body.prompt) * body.n > limits.max_choices \
            and all(isinstance(p, str | list) for p in body.prompt):
        raise InvalidRequestError(
            f"{len(body.prompt)} prompts x n = {body.n} asks for {len(body.prompt) * body.n} choices; "
            f"one request may ask for at most {limits.max_choices}", field="n")
    prompts = parse_prompts(body.prompt, encode, limits.vocab_size)
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    stop_ids = frozenset(body.stop_token_ids or ())
    if any(not 0 <= t < limits.vocab_size for t in stop_ids):
        raise InvalidRequestError(f"stop_token_ids must lie in [0, {limits.vocab_size})", field="stop_token_ids")
    logprobs = body.logprobs
    # logprobs=0 (OpenAI legacy) still asks for the chosen tokens' logprobs; False/None does not.
    want = logprobs is not None and logprobs is not False
    top = body.top_logprobs or 0
    if isinstance(logprobs, int) and not isinstance(logprobs, bool):
        if not 0 <= logprobs <= 20:
            raise InvalidRequestError(f"logprobs = {logprobs} must be true/false or an int in [0, 20]",
                                      field="logprobs")
        top = max(top, logprobs)
    options = []
    for i, ids in enumerate(prompts):
        room = min(limits.max_positions, limits.max_cached_tokens) - len(ids)
        if room < 1:
            raise InvalidRequestError(
                f"prompt{'' if len(prompts) == 1 else f'[{i}]'} has {len(ids)} tokens; the context holds "
                f"{min(limits.max_positions, limits.max_cached_tokens)} (prompt + at least one new token)",
                field="prompt")
        options.append(SamplingOptions(
            max_tokens=min(body.max_tokens or 16, room),
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=max(0, body.top_k or 0),
            stop=stop, stop_token_ids=stop_ids, seed=body.seed, top_logprobs=top,
            ignore_eos=body.ignore_eos, echo=body.echo))
    return ParsedCompletion(prompts, options, body.n, want, top)


@dataclass
class ChoiceState:
    """Accumulates one choice's outputs: the whole choice for JSON bodies, `raw_output` and usage."""

    index: int
    prompt: list[int]
    tokens: list[TokenOut] = field(default_factory=list)
    echo: list[TokenOut] = field(default_factory=list)  # the prompt's rows when echo was asked
    text: str = ""
    finish_reason: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)

    def add(self, out: StepOutput) -> None:
        if out.prompt:
            self.echo = out.prompt
        self.tokens.extend(out.tokens)
        self.text += out.text
        if out.metrics:
            self.metrics.update(out.metrics)
        if out.finish_reason is not None:
            self.finish_reason = out.finish_reason

    def raw_output(self) -> dict[str, Any]:
        """The complete `raw_output` (sent once, with the choice's end): every id, one version per token.

        With echo the completion ids start with the echoed prompt (P + C, aligned with the logprob rows),
        as the official SDK expects; the prompt rows carry the version that computed them.
        """
        rows = self.echo + self.tokens
        return {"prompt_token_ids": self.prompt, "completion_token_ids": [t.token_id for t in rows],
                "policy_versions": [t.policy_version for t in rows]}


class Shaper:
    """Builds choice dicts in the Fireworks shape (`logprobs.content`) plus OpenAI legacy logprob lists."""

    def __init__(self, token_text: Callable[[int], str], raw_output: bool, want_logprobs: bool,
                 top_logprobs: int) -> None:
        self.token_text = token_text
        self.raw_output = raw_output
        self.want_logprobs = want_logprobs
        self.top = top_logprobs

    def _logprobs(self, tokens: list[TokenOut], offset: int) -> dict[str, Any]:
        content, texts, offsets, legacy_top = [], [], [], []
        for tok in tokens:
            text = self.token_text(tok.token_id)
            entry: dict[str, Any] = {"token": text, "token_id": tok.token_id, "bytes": list(text.encode()),
                                     "logprob": tok.logprob, "sampling_logprob": tok.sampling_logprob,
                                     "policy_version": tok.policy_version}
            if self.top:
                alts = tok.top or []
                entry["top_logprobs"] = [{"token": self.token_text(t), "token_id": t, "logprob": lp}
                                         for t, lp in alts]
                legacy_top.append({self.token_text(t): lp for t, lp in alts})
            content.append(entry)
            texts.append(text)
            offsets.append(offset)
            offset += len(text)
        return {"content": content, "tokens": texts, "token_logprobs": [t.logprob for t in tokens],
                "top_logprobs": legacy_top if self.top else None, "text_offset": offsets}

    def chunk(self, state: ChoiceState, tokens: list[TokenOut], text: str, text_offset: int) -> dict[str, Any]:
        """One choice of a stream chunk: the new tokens and text; the complete raw_output only at the end."""
        out: dict[str, Any] = {"index": state.index, "text": text, "finish_reason": state.finish_reason,
                               "logprobs": self._logprobs(tokens, text_offset) if self.want_logprobs else None}
        if tokens:
            out["policy_version"] = tokens[-1].policy_version
        if self.raw_output and state.finish_reason is not None:
            out["raw_output"] = state.raw_output()
        return out

    def whole(self, state: ChoiceState, prompt_text: str) -> dict[str, Any]:
        """The whole choice of a JSON answer (echo: prompt text and rows first)."""
        return self.chunk(state, state.echo + state.tokens, prompt_text + state.text, 0)


def usage(choices: list[ChoiceState]) -> dict[str, int]:
    # The n choices of one prompt share that prompt (same list object), so count it once.
    prompt = sum({id(c.prompt): len(c.prompt) for c in choices}.values())
    completion = sum(len(c.tokens) for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def metric_headers(metrics: dict[str, Any]) -> dict[str, str]:
    return {f"fireworks-{k}": str(metrics[k]) for k in HEADER_KEYS if k in metrics}
