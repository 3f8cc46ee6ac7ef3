"""LoRA snapshots: export a PEFT model's active adapter in a fixed flat layout and describe it for the manifest."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from firetitan.checkpoints import delta as dz
from firetitan.checkpoints.layout import LORA_CONFIG_FILE, LORA_WEIGHTS_FILE
from firetitan.checkpoints.weights import raw_size
from firetitan.errors import InvalidRequestError


def active_adapter_config(peft_model: Any) -> tuple[str, Any]:
    """The name and peft config of `peft_model`'s active adapter; refuses a model without one."""
    adapter = getattr(peft_model, "active_adapter", "default")
    peft_config = getattr(peft_model, "peft_config", {}).get(adapter)
    if peft_config is None:
        raise InvalidRequestError("save_lora needs a peft model with an active adapter", field="peft_model")
    return adapter, peft_config


def write_adapter(peft_model: Any, adapter: str, directory: Path) -> dict[str, torch.Tensor]:
    """Save the adapter into `directory` (`PeftModel.from_pretrained(base, dir)` loads it); its tensors."""
    # No embedding-layer export: it is not needed for LoRA on linear layers and, in "auto" mode,
    # peft would probe the hub for the base model's config.
    peft_model.save_pretrained(str(directory), safe_serialization=True, save_embedding_layers=False)
    if not (directory / LORA_CONFIG_FILE).is_file() or not (directory / LORA_WEIGHTS_FILE).is_file():
        # peft writes non-default adapters into a subfolder; flatten so the layout is fixed.
        sub = directory / adapter
        for f in (LORA_CONFIG_FILE, LORA_WEIGHTS_FILE):
            if (sub / f).is_file():
                os.replace(sub / f, directory / f)
    return load_file(str(directory / LORA_WEIGHTS_FILE))


def manifest_fields(
    peft_config: Any, weights: dict[str, torch.Tensor], base_model: str | None
) -> dict[str, Any]:
    """The manifest fields of a LoRA snapshot (kind, base model, digests, rank / alpha / targets)."""
    return {
        "kind": "lora",
        "base_model": base_model or getattr(peft_config, "base_model_name_or_path", None),
        "dtypes": {k: dz.dtype_name(t.dtype) for k, t in weights.items()},
        "tensor_sha256": {k: dz.tensor_sha256(t) for k, t in weights.items()},
        "full_size_bytes": raw_size(weights),
        "lora": {
            "rank": int(peft_config.r),
            "alpha": float(peft_config.lora_alpha),
            "target_modules": sorted(peft_config.target_modules or []),
        },
    }
