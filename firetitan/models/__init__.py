"""Model and tokenizer loading: the embedded built-in models and any local Hugging Face directory."""

import os

# Before transformers / huggingface_hub are imported by the submodules: they read it at import time.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from firetitan.models.compat import cache_arg_name, forward_with_cache
from firetitan.models.loading import (
    ATTN_IMPLEMENTATION,
    as_dtype,
    export_model,
    load_model,
    load_tokenizer,
    model_config,
)
from firetitan.models.registry import (
    BUILTIN_MODELS,
    DEFAULT_MODEL,
    ENDOFTEXT_ID,
    IM_END_ID,
    IM_START_ID,
    TOKENIZER_DIR,
    VOCAB_SIZE,
    BuiltinModel,
    is_builtin,
    resolve_model_name,
)

__all__ = [
    "ATTN_IMPLEMENTATION",
    "BUILTIN_MODELS",
    "DEFAULT_MODEL",
    "ENDOFTEXT_ID",
    "IM_END_ID",
    "IM_START_ID",
    "TOKENIZER_DIR",
    "VOCAB_SIZE",
    "BuiltinModel",
    "as_dtype",
    "cache_arg_name",
    "export_model",
    "forward_with_cache",
    "is_builtin",
    "load_model",
    "load_tokenizer",
    "model_config",
    "resolve_model_name",
]
