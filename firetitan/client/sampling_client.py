"""`SamplingClient`: Tinker's `sample(prompt, num_samples, sampling_params)` over a DeploymentSampler."""

from __future__ import annotations

from typing import Any

from firetitan.client.sampling import DeploymentSampler, SampledCompletion
from firetitan.errors import InvalidRequestError
from firetitan.futures import APIFuture, failed, run_coroutine
from firetitan.types import ModelInput, SampledSequence, SampleResponse, SamplingParams


class SamplingClient:
    """Tinker-shaped sampling bound to one deployment (and the snapshot it was created for).

    The `num_samples` sequences are requested as the deployment sampler's `fanout` says (by default
    one streaming request each; `fanout="choices"`: one request), so concurrency control and retries
    are the sampler's. Sequence logprobs are the sampling
    (behaviour-policy) logprobs.
    """

    def __init__(self, sampler: DeploymentSampler, *, base_model: str, model_path: str | None = None) -> None:
        self.deployment_sampler = sampler
        self.base_model = base_model
        self.model_path = model_path

    def sample(self, prompt: ModelInput, num_samples: int = 1, sampling_params: SamplingParams | None = None,
               include_prompt_logprobs: bool = False, topk_prompt_logprobs: int = 0, *,
               images: list[str] | None = None) -> APIFuture[SampleResponse]:
        if images:
            return failed(InvalidRequestError("images are not supported: firetitan serves text models",
                                              field="images"))
        return run_coroutine(self._sample(prompt, num_samples, sampling_params, include_prompt_logprobs,
                                          topk_prompt_logprobs))

    async def sample_async(self, prompt: ModelInput, num_samples: int = 1,
                           sampling_params: SamplingParams | None = None, include_prompt_logprobs: bool = False,
                           topk_prompt_logprobs: int = 0, *, images: list[str] | None = None) -> SampleResponse:
        return await self.sample(prompt, num_samples, sampling_params, include_prompt_logprobs,
                                 topk_prompt_logprobs, images=images)

    async def _sample(self, prompt: ModelInput, num_samples: int, params: SamplingParams | None,
                      include_prompt_logprobs: bool, topk_prompt_logprobs: int) -> SampleResponse:
        if include_prompt_logprobs or topk_prompt_logprobs:
            raise InvalidRequestError("sample() does not return prompt logprobs; use compute_logprobs(prompt) "
                                      "(one echo request to the deployment)", field="include_prompt_logprobs")
        params = params or SamplingParams()
        prompt = ModelInput.model_validate(prompt) if not isinstance(prompt, ModelInput) else prompt
        kwargs: dict[str, Any] = {"top_p": params.top_p, "logprobs": True}
        if params.top_k > 0:
            kwargs["top_k"] = params.top_k
        if params.seed is not None:
            kwargs["seed"] = params.seed
        if params.stop is not None:
            kwargs["stop"] = params.stop
        completions = await self.deployment_sampler.sample_with_prompt_tokens(
            prompt.to_ints(), n=num_samples, max_tokens=params.max_tokens or 256,
            temperature=params.temperature, **kwargs)
        return SampleResponse(sequences=[_sequence(c) for c in completions])

    def compute_logprobs(self, prompt: ModelInput, prompt_logprobs_last_n: int | None = None
                         ) -> APIFuture[list[float | None]]:
        """The model's logprob of each prompt token given its prefix (None for the first token, which
        has none, and for tokens before the last `prompt_logprobs_last_n`): one `echo` request."""
        return run_coroutine(self._compute_logprobs(prompt, prompt_logprobs_last_n))

    async def compute_logprobs_async(self, prompt: ModelInput, prompt_logprobs_last_n: int | None = None
                                     ) -> list[float | None]:
        return await self.compute_logprobs(prompt, prompt_logprobs_last_n)

    async def _compute_logprobs(self, prompt: ModelInput, last_n: int | None) -> list[float | None]:
        prompt = ModelInput.model_validate(prompt) if not isinstance(prompt, ModelInput) else prompt
        ids = prompt.to_ints()
        if last_n is not None and not 1 <= last_n <= len(ids) - 1:
            raise InvalidRequestError(f"prompt_logprobs_last_n must be in [1, {len(ids) - 1}] for a "
                                      f"{len(ids)}-token prompt, got {last_n}", field="prompt_logprobs_last_n")
        # One sampled token (max_tokens=1, ignored): every deployment accepts it, and with echo the
        # answer scores the prompt rows given their prefixes. The first prompt token has no row.
        (c,) = await self.deployment_sampler.sample_with_prompt_tokens(
            ids, n=1, max_tokens=1, temperature=1.0, logprobs=True, echo=True)
        rows = c.inference_logprobs or []
        if len(rows) < len(ids) - 1:
            raise InvalidRequestError(f"the deployment scored {len(rows)} of {len(ids) - 1} prompt tokens",
                                      field="echo")
        out: list[float | None] = [None, *rows[: len(ids) - 1]]
        if last_n is not None:
            out = [None] * (len(ids) - last_n) + out[len(ids) - last_n:]
        return out

    def get_tokenizer(self) -> Any:
        return self.deployment_sampler.tokenizer

    def get_base_model(self) -> str:
        return self.base_model

    def __repr__(self) -> str:
        return f"SamplingClient(base_model={self.base_model!r}, model_path={self.model_path!r})"


def _sequence(c: SampledCompletion) -> SampledSequence:
    return SampledSequence(stop_reason="length" if c.finish_reason == "length" else "stop",
                           tokens=c.completion_tokens, logprobs=c.sampling_logprobs or c.inference_logprobs)
