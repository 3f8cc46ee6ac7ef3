"""Fixtures for the checkpoint tests: the nano built-in model, a tied-embedding variant, AdamW steps."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from firetitan.models import load_model, load_tokenizer

torch.set_num_threads(1)

NANO = "firetitan/nano-qwen3"


def _adamw_steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int, seed: int = 0) -> None:
    """`steps` AdamW steps of next-token loss on fixed random tokens (same data for the same seed)."""
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        ids = torch.randint(3, model.config.vocab_size, (2, 12), generator=gen)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()


@pytest.fixture(scope="session")
def adamw_steps():
    return _adamw_steps


@pytest.fixture
def nano() -> torch.nn.Module:
    return load_model(NANO)


@pytest.fixture(scope="session")
def nano_tokenizer():
    return load_tokenizer(NANO)


@pytest.fixture
def tied_model() -> torch.nn.Module:
    """A tiny Qwen3 whose lm_head shares the input embedding (the builtins are untied)."""
    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, tie_word_embeddings=True, max_position_embeddings=64,
    )
    config._attn_implementation = "eager"
    return Qwen3ForCausalLM(config).eval()


@pytest.fixture
def input_ids() -> torch.Tensor:
    return torch.randint(3, 256, (2, 10), generator=torch.Generator().manual_seed(1))
