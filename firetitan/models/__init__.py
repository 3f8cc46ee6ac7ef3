"""Model and tokenizer loading: the embedded built-in models and any local Hugging Face directory."""

import os

# Before transformers / huggingface_hub are imported by the submodules: they read it at import time.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from firetitan._lazy import lazy_getattr
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

# The loaders need torch and transformers (seconds to import); the registry and aliases do not. Names
# from the heavy modules load on first use, so the control plane (names only) never imports torch.
_LAZY = {
    "cache_arg_name": "compat", "forward_with_cache": "compat",
    "ATTN_IMPLEMENTATION": "loading", "as_dtype": "loading", "export_model": "loading",
    "load_model": "loading", "load_tokenizer": "loading", "model_config": "loading",
}

__getattr__ = lazy_getattr("firetitan.models", _LAZY, globals())


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
