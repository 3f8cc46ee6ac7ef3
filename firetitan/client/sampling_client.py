"""`SamplingClient`: Tinker's `sample(prompt, num_samples, sampling_params)` over a DeploymentSampler."""

from __future__ import annotations

from typing import Any

from firetitan.client.sampling import DeploymentSampler, SampledCompletion
from firetitan.errors import InvalidRequestError
from firetitan.futures import APIFuture, run_coroutine
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
               include_prompt_logprobs: bool = False, topk_prompt_logprobs: int = 0) -> APIFuture[SampleResponse]:
        return run_coroutine(self._sample(prompt, num_samples, sampling_params, include_prompt_logprobs,
                                          topk_prompt_logprobs))

    async def sample_async(self, prompt: ModelInput, num_samples: int = 1,
                           sampling_params: SamplingParams | None = None, include_prompt_logprobs: bool = False,
                           topk_prompt_logprobs: int = 0) -> SampleResponse:
        return await self.sample(prompt, num_samples, sampling_params, include_prompt_logprobs,
                                 topk_prompt_logprobs)

    async def _sample(self, prompt: ModelInput, num_samples: int, params: SamplingParams | None,
                      include_prompt_logprobs: bool, topk_prompt_logprobs: int) -> SampleResponse:
        if include_prompt_logprobs or topk_prompt_logprobs:
            raise InvalidRequestError("prompt logprobs are not served by deployments; use the training "
                                      "client's forward() for them", field="include_prompt_logprobs")
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

    def get_tokenizer(self) -> Any:
        return self.deployment_sampler.tokenizer

    def get_base_model(self) -> str:
        return self.base_model

    def __repr__(self) -> str:
        return f"SamplingClient(base_model={self.base_model!r}, model_path={self.model_path!r})"


def _sequence(c: SampledCompletion) -> SampledSequence:
    return SampledSequence(stop_reason="length" if c.finish_reason == "length" else "stop",
                           tokens=c.completion_tokens, logprobs=c.sampling_logprobs or c.inference_logprobs)
