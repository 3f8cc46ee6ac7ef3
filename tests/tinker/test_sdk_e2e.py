"""The unmodified tinker SDK (0.38) against a local firetitan control plane on firetitan/nano-qwen3."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import pytest

from firetitan.server.process import WorkerProcess, spawn_worker

tinker = pytest.importorskip("tinker")
types = tinker.types

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900),
              pytest.mark.filterwarnings("ignore::FutureWarning"), pytest.mark.filterwarnings("ignore::DeprecationWarning")]

BASE = "firetitan/nano-qwen3"
TOKENS = list(range(5, 29))
ROOT = Path(__file__).resolve().parents[2]

API_KEY = "tml-firetitan-test-key"


@dataclass
class TinkerServer:
    home: Path
    worker: WorkerProcess

    @property
    def url(self) -> str:
        return self.worker.url

    def worker_pids(self) -> list[int]:
        """Trainer and deployment workers this control plane started (and that still run)."""
        try:
            children = psutil.Process(self.worker.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        out = []
        for proc in children:
            try:
                cmd = " ".join(proc.cmdline())
                if proc.status() != psutil.STATUS_ZOMBIE and (
                        "firetitan.server.trainer" in cmd or "firetitan.server.deployment" in cmd):
                    out.append(proc.pid)
            except psutil.Error:
                continue
        return out


@pytest.fixture(scope="module")
def tinker_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TinkerServer]:
    home = tmp_path_factory.mktemp("tinker") / "home"
    args = ["--home", str(home), "--trainer-threads", "1", "--replica-threads", "1", "--health-interval", "0.5",
            "--api-key", API_KEY]
    worker = spawn_worker("firetitan.server.control_plane", args, ready_timeout=60, log_path=home / "cp.log")
    try:
        yield TinkerServer(home, worker)
    finally:
        worker.stop(timeout=30)


def datum(tokens: list[int], **inputs: list[float]) -> types.Datum:
    extra = inputs or {"weights": [1.0] * (len(tokens) - 1)}
    return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                       loss_fn_inputs={"target_tokens": tokens[1:], **extra})


def forward_logprobs(tc: tinker.TrainingClient, tokens: list[int]) -> np.ndarray:
    out = tc.forward([datum(tokens)], "cross_entropy").result(timeout=300)
    return out.loss_fn_outputs[0]["logprobs"].to_numpy()


def step(tc: tinker.TrainingClient, tokens: list[int] = TOKENS) -> float:
    fb = tc.forward_backward([datum(tokens)], "cross_entropy")
    opt = tc.optim_step(types.AdamParams(learning_rate=5e-3, eps=1e-8))
    loss = fb.result(timeout=300).metrics["loss:sum"]
    opt.result(timeout=300)
    return loss


@pytest.fixture(scope="module")
def service(tinker_server: TinkerServer) -> Iterator[tinker.ServiceClient]:
    sc = tinker.ServiceClient(base_url=tinker_server.url, api_key=API_KEY)
    yield sc
    sc.close("success")


@pytest.fixture(scope="module")
def trainer(service: tinker.ServiceClient) -> tinker.TrainingClient:
    return service.create_lora_training_client(base_model=BASE, rank=4, seed=0).result(timeout=600)


def test_cross_entropy_and_importance_sampling_train(trainer: tinker.TrainingClient) -> None:
    losses = [step(trainer) for _ in range(4)]
    assert losses[-1] < losses[0], losses
    before = forward_logprobs(trainer, TOKENS)
    assert before.shape == (len(TOKENS) - 1,) and np.all(before < 0)
    n = len(TOKENS) - 1
    fb = trainer.forward_backward([datum(TOKENS, logprobs=before.tolist(), advantages=[1.0] * n)],
                                  "importance_sampling")
    opt = trainer.optim_step(types.AdamParams(learning_rate=5e-3))
    out = fb.result(timeout=300)
    opt.result(timeout=300)
    # Sampled with exactly these weights: every ratio is 1, and a positive advantage raises the logprobs.
    assert out.metrics["ratio:mean"] == pytest.approx(1.0, abs=1e-5)
    assert forward_logprobs(trainer, TOKENS).sum() > before.sum()


def test_malformed_forward_backward_does_not_stall_the_next_call(trainer: tinker.TrainingClient) -> None:
    bad = types.Datum(model_input=types.ModelInput.from_ints(TOKENS[:-1]),
                      loss_fn_inputs={"target_tokens": [10**7] * (len(TOKENS) - 1),
                                      "weights": [1.0] * (len(TOKENS) - 1)})
    fb = trainer.forward_backward([bad], "cross_entropy")
    opt = trainer.optim_step(types.AdamParams(learning_rate=1e-3))
    with pytest.raises(tinker.RequestFailedError, match="outside the vocabulary"):
        fb.result(timeout=120)
    # The rejected request consumed its seq id, so the optim_step behind it runs instead of waiting.
    assert opt.result(timeout=120).metrics is not None

    # Refused by the gateway itself (a readable protobuf with content it cannot serve): same outcome.
    image = types.ModelInput(chunks=[types.EncodedTextChunk(tokens=[5, 6]),
                                     types.ImageChunk(data=b"\x89PNG", format="png", expected_tokens=2)])
    fb = trainer.forward_backward([types.Datum(model_input=image, loss_fn_inputs={
        "target_tokens": [6, 7, 8, 9], "weights": [1.0] * 4})], "cross_entropy")
    opt = trainer.optim_step(types.AdamParams(learning_rate=1e-3))
    with pytest.raises(tinker.RequestFailedError, match="encoded_text"):
        fb.result(timeout=120)
    assert opt.result(timeout=120).metrics is not None
    assert step(trainer) > 0


def test_sampling_matches_forward(service: tinker.ServiceClient, trainer: tinker.TrainingClient) -> None:
    saved = trainer.save_weights_for_sampler("e2e-sampler").result(timeout=300)
    assert saved.path == f"tinker://{trainer.model_id}/sampler_weights/e2e-sampler"
    sampler = service.create_sampling_client(model_path=saved.path)
    prompt = [5, 6, 7, 8]
    res = sampler.sample(types.ModelInput.from_ints(prompt), num_samples=2,
                         sampling_params=types.SamplingParams(max_tokens=6, temperature=1.0, seed=1)).result(timeout=600)
    assert len(res.sequences) == 2
    for seq in res.sequences:
        assert 1 <= len(seq.tokens) <= 6 and len(seq.logprobs) == len(seq.tokens)
        full = prompt + list(seq.tokens)
        ref = forward_logprobs(trainer, full)[len(prompt) - 1:]
        np.testing.assert_allclose(np.array(seq.logprobs), ref, atol=1e-4)

    quick = trainer.save_weights_and_get_sampling_client().result(timeout=600)
    full = prompt + list(res.sequences[0].tokens)
    scored = quick.compute_logprobs(types.ModelInput.from_ints(full)).result(timeout=600)
    assert scored[0] is None
    np.testing.assert_allclose(np.array(scored[1:], dtype=np.float64), forward_logprobs(trainer, full), atol=1e-4)
    again = quick.sample(types.ModelInput.from_ints(prompt), num_samples=1,
                         sampling_params=types.SamplingParams(max_tokens=3)).result(timeout=600)
    assert len(again.sequences) == 1


def test_state_resume_equals_uninterrupted(service: tinker.ServiceClient) -> None:
    run = service.create_lora_training_client(base_model=BASE, rank=4, seed=3).result(timeout=600)
    step(run)
    step(run)
    state = run.save_state("e2e-state").result(timeout=300).path
    assert state == f"tinker://{run.model_id}/weights/e2e-state"
    at_save = forward_logprobs(run, TOKENS)
    step(run)  # the uninterrupted run's next step
    uninterrupted = forward_logprobs(run, TOKENS)

    resumed = service.create_training_client_from_state_with_optimizer(state).result(timeout=600)
    assert resumed.model_id != run.model_id
    np.testing.assert_allclose(forward_logprobs(resumed, TOKENS), at_save, atol=1e-6)
    step(resumed)
    np.testing.assert_allclose(forward_logprobs(resumed, TOKENS), uninterrupted, atol=1e-6)

    weights_only = service.create_training_client_from_state(state).result(timeout=600)
    np.testing.assert_allclose(forward_logprobs(weights_only, TOKENS), at_save, atol=1e-6)

    run.load_state_with_optimizer(state).result(timeout=300)
    step(run)
    np.testing.assert_allclose(forward_logprobs(run, TOKENS), uninterrupted, atol=1e-6)


def test_rl_loop_example_runs(tinker_server: TinkerServer) -> None:
    env = {"TINKER_API_KEY": API_KEY, "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "tinker_rl_loop.py"), "--base-url",
                           tinker_server.url, "--iterations", "2"], env=env, capture_output=True, text=True,
                          timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "iteration 1" in proc.stdout, proc.stdout


def test_close_leaves_no_worker(tinker_server: TinkerServer) -> None:
    before = set(tinker_server.worker_pids())
    sc = tinker.ServiceClient(base_url=tinker_server.url, api_key=API_KEY)
    tc = sc.create_lora_training_client(base_model=BASE, rank=2).result(timeout=600)
    sampler = tc.save_weights_and_get_sampling_client().result(timeout=600)
    sampler.sample(types.ModelInput.from_ints([5, 6]), num_samples=1,
                   sampling_params=types.SamplingParams(max_tokens=2)).result(timeout=600)
    mine = set(tinker_server.worker_pids()) - before
    assert len(mine) >= 2, "a trainer and a sampling replica were started"
    sc.close("success")
    deadline = time.monotonic() + 60
    while mine & set(tinker_server.worker_pids()):
        assert time.monotonic() < deadline, f"workers left after close(): {mine & set(tinker_server.worker_pids())}"
        time.sleep(0.5)


def _post(url: str, path: str, body: dict[str, object]) -> tuple[int, dict[str, object]]:
    import json
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url + "/api/v1/" + path, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json", "X-API-Key": API_KEY})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def test_a_silent_session_expires_and_its_trainer_stops(tmp_path: Path) -> None:
    import os

    home = tmp_path / "home"
    args = ["--home", str(home), "--trainer-threads", "1", "--health-interval", "0.5", "--api-key", API_KEY]
    os.environ["FIRETITAN_TINKER_SESSION_TTL"] = "4"
    try:
        worker = spawn_worker("firetitan.server.control_plane", args, ready_timeout=60, log_path=home / "cp.log")
    finally:
        del os.environ["FIRETITAN_TINKER_SESSION_TTL"]
    server = TinkerServer(home, worker)
    try:
        status, session = _post(server.url, "create_session", {"tags": [], "user_metadata": None, "sdk_version": "x"})
        assert status == 200
        sid = str(session["session_id"])
        status, fut = _post(server.url, "create_model", {"session_id": sid, "model_seq_id": 0, "base_model": BASE,
                                                         "lora_config": {"rank": 2}})
        assert status == 200 and fut["model_id"] == f"{sid}:train:0"
        beating = threading.Event()
        beating.set()

        def beat() -> None:  # what the SDK does every 10 s, here every 0.5 s for the 4 s TTL
            while beating.is_set():
                _post(server.url, "session_heartbeat", {"session_id": sid})
                time.sleep(0.5)

        beater = threading.Thread(target=beat, daemon=True)
        beater.start()
        deadline = time.monotonic() + 300
        while True:
            status, done = _post(server.url, "retrieve_future", {"request_id": fut["request_id"]})
            if done.get("type") == "create_model":
                break
            assert "error" not in done, done
            assert time.monotonic() < deadline
        beating.clear()
        beater.join()
        assert server.worker_pids(), "the model's trainer runs"
        deadline = time.monotonic() + 60
        while server.worker_pids():  # no heartbeat now: the session expires and its trainer is stopped
            assert time.monotonic() < deadline, "trainer still running after the session expired"
            time.sleep(0.5)
        assert _post(server.url, "session_heartbeat", {"session_id": sid})[0] == 410
    finally:
        worker.stop(timeout=30)
