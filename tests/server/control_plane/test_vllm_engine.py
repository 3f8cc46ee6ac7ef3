"""`engine: vllm` deployments: the control plane starts the vLLM-backed worker, routes to it, hot-loads
it, and removes its scratch space on delete; without the vLLM environment the engine is refused (400)."""

from __future__ import annotations

from typing import Any

import pytest
from vllm_env import needs_vllm

from firetitan.errors import InvalidRequestError
from firetitan.server.control_plane.engines import check_engine
from firetitan.server.deployment.vllm_backend.child import VLLM_PYTHON_ENV

ACCT = "/v1/accounts/local"
DEP = f"{ACCT}/deployments/vdep"
HOT = f"{DEP}/hot_load/v1/models/hot_load"
PROMPT = [1, 30, 44, 91, 7, 250, 12, 9]


def test_engine_vllm_is_refused_without_its_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    monkeypatch.setenv(VLLM_PYTHON_ENV, str(tmp_path / "no-such-python"))
    with pytest.raises(InvalidRequestError) as err:
        check_engine("vllm")
    assert err.value.field == "engine" and "no-such-python" in err.value.message
    check_engine("embedded")  # the embedded engine needs nothing more


@pytest.mark.slow
@needs_vllm
def test_vllm_deployment_serves_hot_loads_and_cleans_up(control_plane: Any, home_workers: Any) -> None:
    from firetitan.checkpoints import SnapshotStore
    from firetitan.models import load_model, load_tokenizer

    cp = control_plane
    # The engine comes from the deployment shape (the request names none); `engine` in a request wins.
    dep = cp.ok("POST", f"{ACCT}/deployments?deploymentId=vdep",
                {"baseModel": "firetitan/nano-qwen3", "deploymentShape": "accounts/local/deploymentShapes/nano-qwen3-vllm",
                 "minReplicaCount": 1, "maxReplicaCount": 1})
    assert dep["engine"] == "vllm" and dep["state"] == "CREATING"
    dep = cp.wait_for(DEP, lambda d: d["state"] in ("READY", "FAILED"), timeout=900)
    assert dep["state"] == "READY", dep

    out = cp.ok("POST", f"{DEP}/inference/v1/completions",
                {"prompt": PROMPT, "max_tokens": 6, "raw_output": True, "logprobs": True, "ignore_eos": True,
                 "perf_metrics_in_response": True})
    assert out["backend"] == "vllm"  # answered by the vLLM-backed worker, through the control plane's route
    choice = out["choices"][0]
    assert len(choice["raw_output"]["completion_token_ids"]) == 6
    assert "prefill-queue-duration" in out["perf_metrics"]

    model = load_model("firetitan/nano-qwen3", seed=4321)
    store = SnapshotStore(cp.home / "store")
    identity = store.save_base("vbase", model.state_dict(), model.config, load_tokenizer("firetitan/nano-qwen3"),
                               base_model="firetitan/nano-qwen3", client_suffix="t0").identity
    loaded = cp.ok("POST", HOT, {"identity": identity, "mode": "ASYNC"})
    assert [r["current_snapshot_identity"] for r in loaded["replicas"]] == [identity]
    out = cp.ok("POST", f"{DEP}/inference/v1/completions",
                {"prompt": PROMPT, "max_tokens": 4, "raw_output": True, "ignore_eos": True})
    assert out["choices"][0]["raw_output"]["policy_versions"] == [identity] * 4

    scratch = cp.home / "vllm" / "local" / "vdep"
    assert (scratch / "replica-0" / "vllm.log").is_file()
    status, _ = cp.call("DELETE", DEP)
    assert status == 200
    assert not scratch.exists()
    assert home_workers(cp.home) == []
