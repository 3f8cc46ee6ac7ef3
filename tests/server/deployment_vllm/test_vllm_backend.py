"""The vLLM deployment backend keeps the deployment contract: logprobs equal a trainer forward, hot-load swaps weights.

Runs only where the vLLM environment exists (`make vllm-env`, or FIRETITAN_VLLM_PYTHON); one real worker
process fronting a real `vllm serve` child on loopback, nano-qwen3 exported as an HF directory.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from lora_helpers import random_lora
from vllm_env import needs_vllm

from firetitan.checkpoints import SnapshotStore
from firetitan.models import export_model, load_model, load_tokenizer, model_config
from firetitan.server.process import WorkerProcess, spawn_worker

os.environ.setdefault("HF_HUB_OFFLINE", "1")

NANO = "firetitan/nano-qwen3"
TOL = 1e-4  # fp32 parity between vLLM's CPU kernels and the transformers forward


pytestmark = [pytest.mark.slow, needs_vllm]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_model(NANO, tmp_path_factory.mktemp("vllm-model") / "nano")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> SnapshotStore:
    return SnapshotStore(tmp_path_factory.mktemp("vllm-store"))


@pytest.fixture(scope="module")
def worker(model_dir: Path, store: SnapshotStore, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    logs = tmp_path_factory.mktemp("vllm-logs")
    proc = spawn_worker("firetitan.server.deployment.vllm_backend",
                        ["--base-model", str(model_dir), "--store-dir", str(store.root), "--deployment-id", "vdep",
                         "--max-running-seqs", "8", "--max-model-len", "2048", "--work-dir", str(logs / "work")],
                        threads=1, log_path=logs / "worker.log", ready_timeout=900)
    yield proc
    proc.stop(timeout=30)
    assert not proc.alive()


def _complete(worker: WorkerProcess, **body: object) -> dict:
    resp = httpx.post(f"{worker.url}/inference/v1/completions", json=body, timeout=300)
    assert resp.status_code == 200, resp.text
    return resp.json()


@torch.no_grad()
def _forward_logprobs(weights: dict[str, torch.Tensor] | None, model_dir: Path, prompt: list[int],
                      completion: list[int], temperature: float = 1.0, top_k: int = 0) -> tuple[list[float], list[float]]:
    """(model logprobs, sampling-distribution logprobs) of `completion` given `prompt`, from a trainer-style forward."""
    model = load_model(model_dir)
    if weights is not None:
        model.load_state_dict(weights, strict=False)
    ids = torch.tensor([prompt + completion])
    logits = model(ids).logits[0, len(prompt) - 1:-1].double()
    target = torch.tensor(completion)
    raw = torch.log_softmax(logits, -1).gather(-1, target[:, None])[:, 0]
    scaled = logits / temperature
    if top_k > 0:
        kth = scaled.topk(top_k, dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    sampled = torch.log_softmax(scaled, -1).gather(-1, target[:, None])[:, 0]
    return raw.tolist(), sampled.tolist()


def _check_choice(choice: dict, prompt: list[int], expected_version: str, model_dir: Path,
                  weights: dict[str, torch.Tensor] | None = None, temperature: float = 1.0, top_k: int = 0) -> None:
    completion = choice["raw_output"]["completion_token_ids"]
    assert completion, choice
    content = choice["logprobs"]["content"]
    assert [c["token_id"] for c in content] == completion
    assert choice["raw_output"]["policy_versions"] == [expected_version] * len(completion)
    raw, sampled = _forward_logprobs(weights, model_dir, prompt, completion, temperature, top_k)
    got_raw = [c["logprob"] for c in content]
    got_sampled = [c["sampling_logprob"] for c in content]
    assert max(abs(a - b) for a, b in zip(got_raw, raw, strict=True)) < TOL, (got_raw, raw)
    assert max(abs(a - b) for a, b in zip(got_sampled, sampled, strict=True)) < TOL, (got_sampled, sampled)


PROMPT = [1, 30, 44, 91, 7, 250, 12, 9]


def test_sampling_logprobs_equal_a_trainer_forward(worker: WorkerProcess, model_dir: Path) -> None:
    out = _complete(worker, prompt=PROMPT, max_tokens=12, temperature=1.0, n=2, seed=5, logprobs=True,
                    raw_output=True, perf_metrics_in_response=True, ignore_eos=True)
    assert len(out["choices"]) == 2
    for choice in out["choices"]:
        assert len(choice["raw_output"]["completion_token_ids"]) == 12
        _check_choice(choice, PROMPT, str(model_dir), model_dir)
    perf = out["perf_metrics"]
    assert perf["prefill-queue-duration"] >= 0.0
    assert perf["prompt-tokens"] == len(PROMPT) and perf["completion-tokens"] == 12
    assert out["usage"]["completion_tokens"] == 24


def test_tempered_top_k_sampling_reports_both_logprobs(worker: WorkerProcess, model_dir: Path) -> None:
    out = _complete(worker, prompt=PROMPT, max_tokens=8, temperature=0.7, top_k=20, seed=3, logprobs=True,
                    raw_output=True, ignore_eos=True)
    _check_choice(out["choices"][0], PROMPT, str(model_dir), model_dir, temperature=0.7, top_k=20)


def test_streamed_and_openai_completions(worker: WorkerProcess, model_dir: Path) -> None:
    chunks = []
    with httpx.stream("POST", f"{worker.url}/inference/v1/completions", timeout=300,
                      json={"prompt": PROMPT, "max_tokens": 6, "stream": True, "raw_output": True,
                            "ignore_eos": True, "perf_metrics_in_response": True}) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(httpx.Response(200, content=line[6:]).json())
    ids = chunks[-1]["choices"][0]["raw_output"]["completion_token_ids"]  # complete, on the final chunk
    assert len(ids) == 6
    assert all("raw_output" not in ch for c in chunks[:-1] for ch in c["choices"])
    assert "prefill-queue-duration" in chunks[-1]["perf_metrics"]
    text = httpx.post(f"{worker.url}/v1/completions", timeout=300,
                      json={"model": "vdep", "prompt": "Plant the beans", "max_tokens": 5, "ignore_eos": True}).json()
    assert text["usage"]["completion_tokens"] == 5 and isinstance(text["choices"][0]["text"], str)
    health = httpx.get(f"{worker.url}/health", timeout=30).json()
    assert health["status"] == "ok" and health["backend"] == "vllm"
    assert "vllm:" in httpx.get(f"{worker.url}/metrics", timeout=30).text


def test_hot_load_of_a_base_then_a_delta(worker: WorkerProcess, model_dir: Path, store: SnapshotStore) -> None:
    config, tokenizer = model_config(model_dir), load_tokenizer(model_dir)
    new_base = load_model(NANO, seed=1234).state_dict()
    store.save_base("vllm-base-1", new_base, config, tokenizer)
    url = f"{worker.url}/hot_load/v1/models/hot_load"
    resp = httpx.post(url, json={"identity": "vllm-base-1", "mode": "ASYNC"}, timeout=600)
    assert resp.status_code == 200, resp.text
    assert resp.json()["current_snapshot_identity"] == "vllm-base-1"
    out = _complete(worker, prompt=PROMPT, max_tokens=8, seed=1, logprobs=True, raw_output=True, ignore_eos=True)
    _check_choice(out["choices"][0], PROMPT, "vllm-base-1", model_dir, weights=new_base)

    stepped = {k: v + 0.01 * torch.randn(v.shape, generator=torch.Generator().manual_seed(7)) if v.ndim == 2 else v
               for k, v in new_base.items()}
    store.save_delta("vllm-delta-1", stepped, "vllm-base-1", base_state_dict=new_base)
    wrong = httpx.post(url, timeout=600, json={"identity": "vllm-delta-1", "incremental_snapshot_metadata":
                                               {"previous_snapshot_identity": "not-the-base"}})
    assert wrong.status_code == 409
    resp = httpx.post(url, timeout=600, json={"identity": "vllm-delta-1", "incremental_snapshot_metadata":
                                              {"previous_snapshot_identity": "vllm-base-1"}})
    assert resp.status_code == 200, resp.text
    out = _complete(worker, prompt=PROMPT, max_tokens=8, seed=2, logprobs=True, raw_output=True, ignore_eos=True)
    _check_choice(out["choices"][0], PROMPT, "vllm-delta-1", model_dir, weights=stepped)


def test_async_hot_load_under_load_then_sync(worker: WorkerProcess, model_dir: Path, store: SnapshotStore) -> None:
    """An ASYNC hot-load under load: no request fails or is cut short, and each completion's versions are
    old ones then only the new one. The hot-load is sent as soon as vLLM's own metrics show all 8 streams
    running, not when their first chunks reach the client: the relay can trail vLLM's engine by seconds
    (22 s on one run), and a swap sent that late found vLLM idle, so every stream held one version only.
    Each of the 8 clients (2000, 1900, ... 1300 tokens) keeps streaming back to back until the worker
    reports the new snapshot current, so however long the swap takes, streams are in flight when it lands."""
    import asyncio
    import re
    import time

    config, tokenizer = model_config(model_dir), load_tokenizer(model_dir)
    store.save_base("vllm-base-3", load_model(NANO, seed=78).state_dict(), config, tokenizer)
    url = f"{worker.url}/hot_load/v1/models/hot_load"
    identity = "vllm-base-2"
    store.save_base(identity, load_model(NANO, seed=77).state_dict(), config, tokenizer)
    vllm_metrics = f"{worker.ready['vllm_url']}/metrics"

    async def stream_versions(client: httpx.AsyncClient, tokens: int) -> list[str]:
        body = {"prompt": PROMPT, "max_tokens": tokens, "raw_output": True, "ignore_eos": True, "stream": True}
        versions: list[str] = []
        async with client.stream("POST", f"{worker.url}/inference/v1/completions", json=body) as resp:
            assert resp.status_code == 200
            async for line in resp.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunk = httpx.Response(200, content=line[6:]).json()
                    assert "error" not in chunk, chunk
                    for choice in chunk["choices"]:
                        if "raw_output" in choice:  # complete, on the choice's final chunk
                            versions += choice["raw_output"]["policy_versions"]
        return versions

    async def stream_until(client: httpx.AsyncClient, landed: asyncio.Event, tokens: int) -> list[tuple[int, list[str]]]:
        completions = []
        while not landed.is_set():  # a stream started before the swap landed may span it
            completions.append((tokens, await stream_versions(client, tokens)))
        return completions

    async def vllm_running(client: httpx.AsyncClient) -> float:
        text = (await client.get(vllm_metrics)).text
        return sum(float(m) for m in re.findall(r"^vllm:num_requests_running\{[^}]*\} (\S+)$", text, re.M))

    async def run() -> list[tuple[int, list[str]]]:
        async with httpx.AsyncClient(timeout=600) as client:
            landed = asyncio.Event()
            async with asyncio.TaskGroup() as group:  # a failed stream fails the test, never hangs it
                sampling = [group.create_task(stream_until(client, landed, 2000 - 100 * i)) for i in range(8)]
                deadline = time.monotonic() + 300
                while await vllm_running(client) < 8:  # the worker's --max-running-seqs: all 8 decoding
                    assert time.monotonic() < deadline, "the 8 streams never ran together in vLLM"
                    await asyncio.sleep(0.02)
                swap = await client.post(url, json={"identity": identity, "mode": "ASYNC"})
                assert swap.status_code == 200, swap.text
                deadline = time.monotonic() + 300
                while (await client.get(url)).json()["current_snapshot_identity"] != identity:
                    assert time.monotonic() < deadline, "ASYNC hot-load did not land"
                    await asyncio.sleep(0.2)
                landed.set()
            return [versions for task in sampling for versions in task.result()]

    outs = asyncio.run(run())
    switched = 0
    for tokens, versions in outs:
        assert len(versions) == tokens  # no request failed or was cut short by the swap
        # versions only ever move forward within a completion: old ones first, then the new one
        first_new = versions.index(identity) if identity in versions else len(versions)
        assert identity not in versions[:first_new]
        assert set(versions[first_new:]) <= {identity}
        switched += 0 < first_new < len(versions)
    summary = [(v[0], v[-1], len(set(v))) for _, v in outs]
    assert switched >= 1, f"no completion spanned the swap: {summary}"

    resp = httpx.post(url, json={"identity": "vllm-base-3", "mode": "SYNC"}, timeout=600)
    assert resp.status_code == 200, resp.text
    deadline = time.monotonic() + 300
    while httpx.get(url, timeout=30).json()["current_snapshot_identity"] != "vllm-base-3":
        assert time.monotonic() < deadline, "SYNC hot-load did not finish"
        time.sleep(0.2)
    out = _complete(worker, prompt=PROMPT, max_tokens=4, logprobs=True, raw_output=True, ignore_eos=True)
    assert out["choices"][0]["raw_output"]["policy_versions"] == ["vllm-base-3"] * 4


def test_lora_snapshot_is_served_merged_and_matches_the_peft_model(worker: WorkerProcess, model_dir: Path,
                                                                   store: SnapshotStore) -> None:
    """A LoRA snapshot (a PEFT adapter) is merged into the startup weights and swapped in like a base: the
    served logprobs equal the PEFT model's merged forward (1e-4) and carry the adapter's identity."""
    peft_model = random_lora(load_model(model_dir))
    adapter = store.save_lora("vllm-lora", peft_model, base_model=str(model_dir))
    merged = {k: v.clone() for k, v in peft_model.merge_and_unload().state_dict().items()}

    resp = httpx.post(f"{worker.url}/hot_load/v1/models/hot_load", json={"identity": adapter.identity},
                      timeout=600)
    assert resp.status_code == 200, resp.text
    out = _complete(worker, prompt=PROMPT, max_tokens=8, seed=4, logprobs=True, raw_output=True, ignore_eos=True)
    _check_choice(out["choices"][0], PROMPT, adapter.identity, model_dir, weights=merged)
