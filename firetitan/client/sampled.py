"""What sampling returns: `SampledCompletion` (one completion, aligned for training) and `SampledRequestResult`."""

from __future__ import annotations

import dataclasses
from typing import Any

from firetitan.client.server_metrics import ServerMetrics


@dataclasses.dataclass
class SampledCompletion:
    """One completion, aligned for training: `full_tokens = prompt + completion`.

    The fields up to `sampling_mask_references` are the hosted SDK's, in its order. With `echo=True`
    the logprob lists hold P+C-1 rows (every token after the first, given its prefix: the rows a
    trainer forward gives) and `logprobs_echoed` is set; otherwise they hold the C completion rows.
    """

    text: str
    full_tokens: list[int]
    prompt_len: int
    finish_reason: str = "unknown"
    completion_len: int = 0
    inference_logprobs: list[float] | None = None  # the model's logprob of each token (`logprob`)
    sampling_logprobs: list[float] | None = None  # the behaviour policy's, after temperature (`sampling_logprob`)
    logprobs_echoed: bool = False
    routing_matrices: Any = None  # MoE router replay: not served by firetitan, always None
    echoed_prompt_logprob_count: int = 0
    inference_topk_token_ids: list[list[int]] | None = None  # with top_logprobs=K: K ids per logprob row
    inference_topk_logprobs: list[list[float]] | None = None
    top_sampling_references: Any = None  # hosted shared-storage references: always None here
    sampling_mask_references: Any = None
    _: dataclasses.KW_ONLY
    policy_version: str | None = None
    policy_versions: list[str] | None = None  # one per completion token
    metrics: ServerMetrics | None = None

    @property
    def prompt_tokens(self) -> list[int]:
        return self.full_tokens[: self.prompt_len]

    @property
    def completion_tokens(self) -> list[int]:
        return self.full_tokens[self.prompt_len:]


@dataclasses.dataclass
class SampledRequestResult:
    """One logical sampling request (one prompt, one completion) and what it took."""

    completions: list[SampledCompletion]
    server_metrics: ServerMetrics | None
    logical_request_id: str
    attempts: int
    wall_seconds: float
    upstream_response_id: str | None = None
    server_attempts: tuple[Any, ...] = ()
