"""The built-in model names, their architectures and seeds, and name-or-path resolution."""

from __future__ import annotations

import os
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path
from typing import Any

from firetitan.errors import ModelNotFoundError

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
TOKENIZER_DIR = ASSETS_DIR / "tokenizer"

# Token ids fixed by scripts/train_tokenizer.py: special tokens are added first, in this order.
ENDOFTEXT_ID, IM_START_ID, IM_END_ID = 0, 1, 2
VOCAB_SIZE = 4096


@dataclass(frozen=True)
class BuiltinModel:
    """A model that ships as an architecture plus a seed; its weights are made, not downloaded."""

    name: str
    description: str
    seed: int
    config: dict[str, Any] = dataclass_field(default_factory=dict)

    def config_kwargs(self) -> dict[str, Any]:
        """Full `Qwen3Config` keyword arguments (shared defaults + this model's sizes)."""
        return {**_COMMON_CONFIG, **self.config}


# Untied embeddings: a state dict without shared tensors saves with plain `safetensors.save_file`,
# and the extra lm_head brings tiny-qwen3 to about 2M parameters.
_COMMON_CONFIG: dict[str, Any] = {
    "vocab_size": VOCAB_SIZE,
    "max_position_embeddings": 2048,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    "rms_norm_eps": 1e-6,
    "initializer_range": 0.02,
    "hidden_act": "silu",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "use_sliding_window": False,
    "tie_word_embeddings": False,
    "use_cache": True,
    "bos_token_id": ENDOFTEXT_ID,
    "eos_token_id": IM_END_ID,
    "pad_token_id": ENDOFTEXT_ID,
}

DEFAULT_MODEL = "firetitan/tiny-qwen3"

BUILTIN_MODELS: dict[str, BuiltinModel] = {
    m.name: m
    for m in (
        BuiltinModel(
            name="firetitan/tiny-qwen3",
            description="Qwen3 architecture, hidden 128, 4 layers, ~1.8M parameters (the default)",
            seed=1234,
            config={
                "hidden_size": 128,
                "intermediate_size": 384,
                "num_hidden_layers": 4,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "head_dim": 32,
                "max_window_layers": 4,
            },
        ),
        BuiltinModel(
            name="firetitan/nano-qwen3",
            description="Qwen3 architecture, hidden 64, 2 layers, ~0.6M parameters (for fast tests)",
            seed=4321,
            config={
                "hidden_size": 64,
                "intermediate_size": 192,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "num_key_value_heads": 1,
                "head_dim": 32,
                "max_window_layers": 2,
            },
        ),
    )
}


def is_builtin(name: str | os.PathLike[str] | None) -> bool:
    """True when `name` is a built-in model name (case and surrounding spaces ignored)."""
    return isinstance(name, str) and _builtin_key(name) is not None


def _builtin_key(name: str) -> str | None:
    # Only the full "firetitan/..." spelling: a bare "nano-qwen3" could equally be a local directory.
    key = name.strip().lower()
    return key if key in BUILTIN_MODELS else None


def resolve_model_name(name_or_path: str | os.PathLike[str] | None, *, field: str = "base_model") -> str:
    """Canonical built-in name, or the absolute path of a local model directory.

    `None` or "" means the default built-in. Built-in names win over a same-named relative path.
    Raises `ModelNotFoundError` (naming `field`) at once when neither matches; nothing is ever looked
    up on a hub.
    """
    if name_or_path is None or (isinstance(name_or_path, str) and not name_or_path.strip()):
        return DEFAULT_MODEL
    if isinstance(name_or_path, str):
        key = _builtin_key(name_or_path)
        if key is not None:
            return key
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(
                f"model directory {str(path)!r} has no config.json; a local model directory needs "
                "config.json + *.safetensors (+ tokenizer files)",
                field=field,
            )
        return str(path.resolve())
    raise ModelNotFoundError(
        f"unknown model {str(name_or_path)!r}: not a built-in and not a local directory. "
        f"Built-in models: {', '.join(BUILTIN_MODELS)}; or pass the path of a local Hugging Face "
        "model directory (config.json + *.safetensors + tokenizer files). Hub downloads are disabled.",
        field=field,
    )
