"""Load models, tokenizers and configs from a built-in name or a local directory, never from a hub."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from firetitan.errors import ConfigError, ModelNotFoundError
from firetitan.logging import get_logger
from firetitan.models.init import init_weights_, skip_default_init
from firetitan.models.registry import (
    BUILTIN_MODELS,
    ENDOFTEXT_ID,
    IM_END_ID,
    TOKENIZER_DIR,
    resolve_model_name,
)

# HF_HUB_OFFLINE is set in firetitan/models/__init__.py; `local_files_only=True` on every call below is
# the guarantee that holds even when transformers was imported before firetitan.

# Eager attention is plain matmul + softmax: identical math for a full forward (trainer) and for
# KV-cached decoding (deployment), with no kernel choice that depends on shapes or masks.
ATTN_IMPLEMENTATION = "eager"

log = get_logger(__name__)


def model_config(name_or_path: str | os.PathLike[str] | None) -> PretrainedConfig:
    """The transformers config of a built-in or a local directory (no weights are read)."""
    resolved = resolve_model_name(name_or_path)
    if resolved in BUILTIN_MODELS:
        config = Qwen3Config(**BUILTIN_MODELS[resolved].config_kwargs())
        config.name_or_path = resolved
    else:
        try:
            config = AutoConfig.from_pretrained(resolved, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ModelNotFoundError(f"cannot read config of model directory {resolved!r}: {exc}",
                                     field="base_model") from exc
    config._attn_implementation = ATTN_IMPLEMENTATION
    return config


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """A torch floating dtype from a dtype or its name ("float32", "bfloat16", "float16")."""
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not supported; use one of {', '.join(_DTYPES)}", field="dtype")
    return _DTYPES[name]


def load_model(
    name_or_path: str | os.PathLike[str] | None,
    dtype: torch.dtype | str = torch.float32,
    seed: int | None = None,
) -> PreTrainedModel:
    """A causal LM in eval mode on CPU.

    Built-ins are created from their architecture and initialised from their seed (or `seed` if given),
    bit-identically in every process. A local directory is read with `from_pretrained`; `seed` is
    ignored for it. Raises `ModelNotFoundError` for an unknown name or an unreadable directory.
    """
    resolved = resolve_model_name(name_or_path)
    dtype = as_dtype(dtype)
    started = time.perf_counter()
    if resolved in BUILTIN_MODELS:
        model = _build_builtin(resolved, dtype, seed)
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(
                resolved, dtype=dtype, local_files_only=True, attn_implementation=ATTN_IMPLEMENTATION
            )
        except (OSError, ValueError) as exc:
            raise ModelNotFoundError(
                f"cannot load model directory {resolved!r}: {exc}", field="base_model"
            ) from exc
        model.eval()
    log.debug("model.loaded", model=resolved, dtype=str(dtype), params=model.num_parameters(),
              seconds=round(time.perf_counter() - started, 3))
    return model


def _build_builtin(name: str, dtype: torch.dtype, seed: int | None) -> PreTrainedModel:
    spec = BUILTIN_MODELS[name]
    config = model_config(name)
    with skip_default_init():
        model = Qwen3ForCausalLM(config)
    init_weights_(model, spec.seed if seed is None else seed, std=config.initializer_range)
    model.generation_config = GenerationConfig(
        bos_token_id=ENDOFTEXT_ID, eos_token_id=IM_END_ID, pad_token_id=ENDOFTEXT_ID
    )
    return model.to(dtype=dtype).eval()


_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model")


def load_tokenizer(name_or_path: str | os.PathLike[str] | None) -> PreTrainedTokenizerFast:
    """The fast tokenizer of a built-in (the shared byte-level BPE) or of a local directory."""
    resolved = resolve_model_name(name_or_path, field="tokenizer_model")
    path = TOKENIZER_DIR if resolved in BUILTIN_MODELS else Path(resolved)
    # AutoTokenizer would otherwise build an *empty* tokenizer from config.json alone.
    if not any((path / f).is_file() for f in _TOKENIZER_FILES):
        raise ModelNotFoundError(
            f"model directory {str(path)!r} has no tokenizer files (one of {', '.join(_TOKENIZER_FILES)})",
            field="tokenizer_model",
        )
    try:
        if resolved in BUILTIN_MODELS:
            return PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(
            f"cannot load a tokenizer from {str(path)!r} (needs tokenizer.json + tokenizer_config.json): {exc}",
            field="tokenizer_model",
        ) from exc


def export_model(
    name_or_path: str | os.PathLike[str] | None,
    out_dir: str | os.PathLike[str],
    dtype: torch.dtype | str = torch.float32,
    seed: int | None = None,
) -> Path:
    """Write a model as a plain local HF directory (config.json, model.safetensors, tokenizer files)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = load_model(name_or_path, dtype=dtype, seed=seed)
    model.save_pretrained(out)
    load_tokenizer(name_or_path).save_pretrained(out)
    return out
