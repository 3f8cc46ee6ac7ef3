"""The official fireworks-ai sampler reads our completions as it reads Fireworks': aligned tokens and logprobs."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from firetitan.models import load_model, load_tokenizer
from firetitan.server.process import WorkerProcess

NANO = "firetitan/nano-qwen3"
sdk = pytest.importorskip("fireworks.training.sdk.sampling")


def _forward(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    return lp[:-1].gather(1, torch.tensor(ids[1:]).unsqueeze(1)).squeeze(1)


@pytest.mark.parametrize("echo", [False, True])
async def test_official_sampler_gets_aligned_completions(worker: WorkerProcess, echo: bool) -> None:
    model = load_model(NANO)
    sampler = sdk.DeploymentSampler(worker.url, "test-dep", "unused", load_tokenizer(NANO))
    prompt = [1, 70, 71, 72, 73]
    try:
        out = await sampler.sample_with_prompt_tokens(prompt, n=2, max_tokens=12, temperature=1.0, logprobs=True,
                                                      echo=echo, ignore_eos=True)
    finally:
        close = getattr(sampler, "aclose", None) or getattr(sampler, "close", None)
        if close is not None:
            result = close()
            if hasattr(result, "__await__"):
                await result
    assert len(out) == 2
    for c in out:
        fields = {f.name: getattr(c, f.name) for f in dataclasses.fields(c)}
        full = fields["full_tokens"]
        assert full[: len(prompt)] == prompt and len(full) == len(prompt) + 12  # not prompt + last chunk
        want = _forward(model, full)
        lps = torch.tensor(fields["inference_logprobs"])
        if echo:  # P + C - 1 training-aligned rows
            assert fields["logprobs_echoed"] and len(lps) == len(full) - 1
            assert torch.allclose(lps, want, atol=1e-4)
        else:
            assert len(lps) == 12 and torch.allclose(lps, want[len(prompt) - 1 :], atol=1e-4)
