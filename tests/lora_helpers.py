"""A PEFT LoRA model with non-zero adapters, for tests that hot-load a LoRA snapshot and compare logprobs."""

from __future__ import annotations

import torch
from peft import LoraConfig, PeftModel, get_peft_model


def random_lora(model: torch.nn.Module, seed: int = 9) -> PeftModel:
    """`model` wrapped with rank-4 adapters on q/v/down projections whose B matrices are random (0.2 scale),
    so the adapter visibly changes the outputs; in eval mode."""
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.2 * torch.randn(param.shape, generator=gen))
    return peft_model.eval()
