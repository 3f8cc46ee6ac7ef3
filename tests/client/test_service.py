"""FiretitanServiceClient: config validation, and one real service with delete-on-close cleanup."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from firetitan import types
from firetitan.client.config import FiretitanProvisioningConfig
from firetitan.client.service import FiretitanServiceClient
from firetitan.errors import ConfigError
from firetitan.futures import run_sync
from firetitan.home import HomeLayout, read_discovery
from firetitan.process import stop_pid


def test_seed_keyword_arguments_validate_into_a_config() -> None:
    service = FiretitanServiceClient.from_firetitan_config(
        api_key="k", base_url="http://127.0.0.1:1", base_model="firetitan/tiny-qwen3",
        tokenizer_model="firetitan/tiny-qwen3", lora_rank=0,
        training_shape_id="accounts/local/trainingShapes/tiny-qwen3-cpu", deployment_id="research-serving",
        learning_rate=1e-5, replica_count=1, cleanup_trainer_on_close=True,
        cleanup_deployment_on_close="scale_to_zero")
    assert service.config.training_shape_id == "accounts/local/trainingShapes/tiny-qwen3-cpu"
    assert service.deployment_id == "research-serving"
    assert service.trainer_job_id is None  # lazy: nothing provisioned yet
    assert service.base_url == "http://127.0.0.1:1"
    service.close()  # closing an unprovisioned service touches nothing
    service.close()


def test_hosted_aliases_and_defaults() -> None:
    cfg = FiretitanProvisioningConfig.from_kwargs(model_name="firetitan/nano-qwen3", trainer_id="job-1",
                                                  deployment_replica_count=0, inactivity_timeout="600s")
    assert (cfg.base_model, cfg.trainer_job_id, cfg.replica_count) == ("firetitan/nano-qwen3", "job-1", 1)
    assert cfg.inactivity_timeout == 600.0
    assert cfg.cleanup_trainer_on_close is False and cfg.cleanup_deployment_on_close is None
    assert cfg.tokenizer_name == "firetitan/nano-qwen3"


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"cleanup_deployment_on_close": "shutdown"}, "cleanup_deployment_on_close"),
    ({"trainer_job_id": "Has_Upper"}, "trainer_job_id"),
    ({"training_shape_id": "tiny-qwen3-cpu"}, "training_shape_id"),
    ({"lora_rank": -1}, "lora_rank"),
    ({"learning_rate": 0}, "learning_rate"),
    ({"no_such_option": 1}, "no_such_option"),
    ({"device": "gpu"}, "device"),
    ({"dtype": "float16"}, "dtype"),
])
def test_bad_config_raises_config_error_naming_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError) as err:
        FiretitanServiceClient.from_firetitan_config(base_model="firetitan/nano-qwen3", **kwargs)
    assert err.value.field == field


def test_missing_base_model_is_named() -> None:
    with pytest.raises(ConfigError) as err:
        FiretitanServiceClient.from_firetitan_config(lora_rank=0)
    assert err.value.field == "base_model"


@pytest.fixture
def ft_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    home = tmp_path / "ft-home"
    for key, value in {"FIRETITAN_HOME": str(home), "FIRETITAN_TRAINER_THREADS": "1",
                       "FIRETITAN_REPLICA_THREADS": "1", "HF_HUB_OFFLINE": "1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("FIRETITAN_BASE_URL", raising=False)
    monkeypatch.delenv("FIRETITAN_API_KEY", raising=False)
    yield home
    info = read_discovery(HomeLayout(home))
    if info is not None:
        stop_pid(int(info["pid"]), timeout=20)


@pytest.mark.slow
def test_service_provisions_samples_references_and_deletes_what_it_created(ft_home: Path, home_workers: Any) -> None:
    service = FiretitanServiceClient.from_firetitan_config(
        base_model="firetitan/nano-qwen3", lora_rank=0, deployment_id="svc-delete",
        cleanup_trainer_on_close=True, cleanup_deployment_on_close="delete")
    with service:
        client = service.create_training_client(base_model="firetitan/nano-qwen3", lora_rank=0)
        assert service.create_training_client() is client  # idempotent provisioning
        assert service.trainer_job_id is not None and service.deployment_id == "svc-delete"
        tokens = list(range(20, 36))
        datum = types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                            loss_fn_inputs={"target_tokens": tokens[1:]})
        # Full-parameter policy: the reference is a separate forward-only trainer owned by the service.
        reference = service.create_reference_client("firetitan/nano-qwen3", lora_rank=0)
        assert service.reference_job_id is not None and not reference.shares_policy_trainer
        before = reference.forward([datum]).result().loss_fn_outputs[0]["logprobs"].to_torch()
        client.forward_backward([datum], "cross_entropy").result()
        client.optim_step(types.AdamParams(learning_rate=1e-2)).result()
        after_ref = reference.forward([datum]).result().loss_fn_outputs[0]["logprobs"].to_torch()
        after_policy = client.forward([datum]).result().loss_fn_outputs[0]["logprobs"].to_torch()
        assert after_ref.allclose(before)  # frozen
        assert after_policy.sum() > before.sum()  # trained towards the targets

        saved = client.save_weights_for_sampler("svc").result()
        sampling = service.create_sampling_client(model_path=saved.path)
        response = sampling.sample(types.ModelInput.from_ints(tokens[:4]), 2,
                                   types.SamplingParams(max_tokens=3, temperature=1.0)).result()
        assert len(response.sequences) == 2 and all(len(s.tokens) <= 3 for s in response.sequences)
        assert all(s.logprobs is not None and len(s.logprobs) == len(s.tokens) for s in response.sequences)
        grouped = service.create_sampling_client(fanout="choices", stream=False)  # one request, 3 choices
        response = grouped.sample(types.ModelInput.from_ints(tokens[:4]), 3,
                                  types.SamplingParams(max_tokens=3, temperature=1.0)).result()
        assert len(response.sequences) == 3 and all(1 <= len(s.tokens) <= 3 for s in response.sequences)
        assert all(s.logprobs is not None and len(s.logprobs) == len(s.tokens) for s in response.sequences)
        assert grouped.deployment_sampler.concurrency_controller.step_completed()["requests"] == 1
        assert len(home_workers(ft_home)) == 3  # policy trainer, reference trainer, one replica
    # close(): the deployment is gone, both trainers deleted, no worker process left.
    import json
    import urllib.error
    import urllib.request

    info = read_discovery(HomeLayout(ft_home))
    assert info is not None
    key = (ft_home / "api_key").read_text().strip()

    def get(path: str) -> tuple[int, dict]:
        req = urllib.request.Request(info["url"] + path, headers={"Authorization": f"Bearer {key}"})
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    assert get("/v1/accounts/local/deployments/svc-delete")[0] == 404
    jobs = get("/v1/accounts/local/rlorTrainerJobs")[1]["rlorTrainerJobs"]
    assert sorted(j["state"] for j in jobs) == ["JOB_STATE_DELETED", "JOB_STATE_DELETED"]
    assert home_workers(ft_home) == []
    service.close()  # idempotent
    assert os.environ["FIRETITAN_HOME"] == str(ft_home)


@pytest.mark.slow
def test_lora_reference_reuses_the_policy_trainer_with_adapters_off(ft_home: Path, home_workers: Any) -> None:
    with FiretitanServiceClient.from_firetitan_config(
            base_model="firetitan/nano-qwen3", lora_rank=4, create_deployment=False,
            cleanup_trainer_on_close=True) as service:
        client = service.create_training_client()
        reference = service.create_reference_client("firetitan/nano-qwen3", lora_rank=0)
        assert reference.shares_policy_trainer and service.reference_job_id is None
        assert service.deployment_id is None
        tokens = list(range(40, 60))
        datum = types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                            loss_fn_inputs={"target_tokens": tokens[1:]})
        base = reference.forward([datum]).result().loss_fn_outputs[0]["logprobs"].to_torch()
        for _ in range(3):
            client.forward_backward([datum], "cross_entropy").result()
            client.optim_step(types.AdamParams(learning_rate=5e-2)).result()
        policy = client.forward([datum]).result().loss_fn_outputs[0]["logprobs"].to_torch()
        frozen = reference.forward([datum]).result().loss_fn_outputs[0]["logprobs"].to_torch()
        assert frozen.allclose(base, atol=1e-5) and policy.sum() > base.sum()
        assert len(home_workers(ft_home)) == 1  # one trainer, no second model
    assert home_workers(ft_home) == []


@pytest.mark.slow
def test_reattached_deployment_woken_from_zero_goes_back_to_zero(ft_home: Path, home_workers: Any) -> None:
    first = FiretitanServiceClient.from_firetitan_config(
        base_model="firetitan/nano-qwen3", lora_rank=0, deployment_id="svc-wake",
        cleanup_trainer_on_close=True, cleanup_deployment_on_close="scale_to_zero")
    with first:
        first.create_deployment_sampler()
    assert home_workers(ft_home) == []  # created here, so scaled to zero by close()
    # A second service re-attaches, wakes it for its own use, and leaves it as it found it.
    second = FiretitanServiceClient.from_firetitan_config(
        base_model="firetitan/nano-qwen3", lora_rank=0, deployment_id="svc-wake",
        cleanup_trainer_on_close=True, cleanup_deployment_on_close="delete")
    with second:
        second.create_deployment_sampler()
        assert len(home_workers(ft_home)) == 2  # its trainer and the woken replica
    assert home_workers(ft_home) == []
    info = read_discovery(HomeLayout(ft_home))
    assert info is not None
    import json
    import urllib.request

    key = (ft_home / "api_key").read_text().strip()
    req = urllib.request.Request(info["url"] + "/v1/accounts/local/deployments/svc-wake",
                                 headers={"Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        dep = json.loads(resp.read())
    assert dep["maxReplicaCount"] == 0  # still there (not ours to delete), back at zero replicas


@pytest.mark.slow
def test_hot_load_is_one_request_in_steady_state_and_loads_a_foreign_base_first(ft_home: Path) -> None:
    import torch

    from firetitan.checkpoints import SnapshotStore
    from firetitan.models import load_model

    with FiretitanServiceClient.from_firetitan_config(
            base_model="firetitan/nano-qwen3", lora_rank=0, deployment_id="svc-hot",
            cleanup_trainer_on_close=True, cleanup_deployment_on_close="delete") as service:
        client = service.create_training_client()
        sampler = service.create_deployment_sampler()
        tokens = list(range(20, 36))
        datum = types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                            loss_fn_inputs={"target_tokens": tokens[1:]})

        def train_and_save(name: str) -> Any:
            client.forward_backward([datum], "cross_entropy").result()
            client.optim_step(types.AdamParams(learning_rate=1e-2)).result()
            return client.save_weights_for_sampler(name).result()

        base = client.save_weights_for_sampler("own-base").result()
        service.hotload_sampler_snapshot(base.path)
        assert service._http is not None
        calls: list[tuple[str, str]] = []
        original = service._http.request_json

        async def counting(method: str, path: str, **kw: Any) -> Any:
            calls.append((method, path.rsplit("/", 1)[-1]))
            return await original(method, path, **kw)

        service._http.request_json = counting  # type: ignore[method-assign]

        def served(status: dict) -> list[tuple[str, str]]:
            return [(r["current_snapshot_identity"], r["base_snapshot_identity"]) for r in status["replicas"]]

        delta = train_and_save("own-1")
        assert delta.checkpoint_type == "delta"
        assert served(service.hotload_sampler_snapshot(delta.path)) == [(delta.path, base.path)]
        assert calls == [("POST", "hot_load")]  # no manifest lookup, no status poll

        # Another trainer's base and delta (written straight into the shared store): the one-request
        # try is refused before any weight changes, then the base loads first.
        model = load_model("firetitan/nano-qwen3")
        store = SnapshotStore(ft_home / "store")
        state = {k: v + 0.01 for k, v in model.state_dict().items()}
        with torch.no_grad():
            foreign_base = store.save_base("foreign", state, model.config, base_model="firetitan/nano-qwen3",
                                           client_suffix="x")
            foreign = store.save_delta("foreign-1", {k: v * 1.5 for k, v in state.items()},
                                       foreign_base.identity, client_suffix="x")
        calls.clear()
        assert served(service.hotload_sampler_snapshot(foreign.identity)) == [(foreign.identity,
                                                                                foreign_base.identity)]
        assert calls[0] == ("POST", "hot_load") and ("GET", foreign.identity) in calls
        # And back to this trainer's deltas: its base is reloaded under them.
        delta = train_and_save("own-2")
        assert served(service.hotload_sampler_snapshot(delta.path)) == [(delta.path, base.path)]

        # The sampler talks to the replica itself (same loopback as the control plane), not the gateway.
        out = run_sync(sampler.sample_with_prompt_tokens(tokens[:4], n=3, max_tokens=2))
        assert len(out) == 3 and all(c.policy_version for c in out)
        assert sampler.routing is not None and len(sampler.routing.urls) == 1
        assert sampler.routing.urls[0] != sampler.base_url and "/deployments/" not in sampler.routing.urls[0]
