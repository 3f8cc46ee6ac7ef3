"""Which worker a deployment's `engine` runs: its module, extra flags, readiness timeout and scratch space."""

from __future__ import annotations

import shutil
from pathlib import Path

from firetitan.errors import ConfigError, InvalidRequestError
from firetitan.server.control_plane.supervisor import DEPLOYMENT_MODULE, VLLM_DEPLOYMENT_MODULE

ENGINE_MODULES = {"embedded": DEPLOYMENT_MODULE, "vllm": VLLM_DEPLOYMENT_MODULE}


def replica_module(engine: str) -> str:
    return ENGINE_MODULES[engine]


def check_engine(engine: str) -> None:
    """Refuse `engine: vllm` at creation (400 naming `engine`) when no vLLM interpreter is configured."""
    if engine != "vllm":
        return
    from firetitan.server.deployment.vllm_backend.child import vllm_python

    try:
        vllm_python()
    except ConfigError as exc:
        raise InvalidRequestError(f"engine 'vllm' needs the vLLM environment: {exc.message}",
                                  field="engine") from exc


def _scratch(root: Path, account: str, deployment_id: str) -> Path:
    return root / "vllm" / account / deployment_id


def replica_args(engine: str, root: Path, account: str, deployment_id: str, index: int) -> list[str]:
    """Flags beyond the embedded worker's: vLLM replicas keep the exported model, prepared snapshots and
    `vllm.log` under the home (one directory per replica, reused on restart, removed with the deployment)."""
    if engine != "vllm":
        return []
    return ["--work-dir", str(_scratch(root, account, deployment_id) / f"replica-{index}")]


def ready_timeout(engine: str, embedded: float, vllm: float) -> float:
    # vLLM needs minutes to start (imports, model load, CPU warm-up) where the embedded engine needs seconds.
    return vllm if engine == "vllm" else embedded


def remove_scratch(root: Path, account: str, deployment_id: str) -> None:
    shutil.rmtree(_scratch(root, account, deployment_id), ignore_errors=True)
