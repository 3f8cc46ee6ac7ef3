"""Reconnect: a client process dies mid-training; a new one picks up the trainer and deployment."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from firetitan import types
from firetitan.client.service import FiretitanServiceClient

SCRIPT = str(Path(__file__).with_name("reconnect_client.py"))


@pytest.mark.slow
def test_a_new_process_continues_training_and_serves_the_next_snapshot(home: Any) -> None:
    proc = subprocess.Popen([sys.executable, SCRIPT, "recon-trainer", "recon-dep"], env=home.env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    last: dict[str, Any] = {}
    try:
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("{"):
                last = json.loads(line)
                if last["step"] >= 3:
                    break
        assert last.get("step", 0) >= 3, "".join(lines)[-3000:]
    finally:
        proc.kill()  # SIGKILL mid-training: the client gets no chance to clean up
        proc.wait(timeout=30)

    service = FiretitanServiceClient.from_firetitan_config(
        base_model="firetitan/nano-qwen3", trainer_job_id="recon-trainer", deployment_id="recon-dep",
        cleanup_trainer_on_close=True, cleanup_deployment_on_close="delete")
    try:
        client = service.create_training_client()
        assert service.trainer_job_id == "recon-trainer" and service.deployment_id == "recon-dep"
        info = client.get_info().result()
        # The trainer kept its weights and counters: at least the steps the dead client finished.
        assert info.step >= last["step"]
        tokens = list(range(10, 40))
        datum = types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                            loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)})
        client.forward_backward([datum], "cross_entropy").result()
        client.optim_step(types.AdamParams(learning_rate=1e-2)).result()
        assert client.get_info().result().step == info.step + 1
        saved = client.save_weights_for_sampler("after-reconnect").result()
        sampler = service.create_deployment_sampler(model_path=saved.path)
        import asyncio

        completions = asyncio.run(sampler.sample_with_prompt_tokens([5, 6, 7], n=2, max_tokens=3))
        assert [c.policy_version for c in completions] == [saved.path, saved.path]
        status = home.http()("GET", "/v1/accounts/local/deployments/recon-dep")[1]
        assert status["currentSnapshotIdentity"] == saved.path
        # DCP resume by name: the state the dead client saved at step 2, optimizer included.
        client.load_state_with_optimizer("step-2").result()
        assert client.get_info().result().step == 2
        names = [c["name"].rsplit("/", 1)[-1] for c in service.list_checkpoints()]
        assert names == ["step-2"]
    finally:
        service.close()
        service.close()  # idempotent
    # This service only re-attached: close() leaves the trainer and the deployment alone.
    call = home.http()
    assert call("GET", "/v1/accounts/local/rlorTrainerJobs/recon-trainer")[1]["state"] == "JOB_STATE_RUNNING"
    dep = call("GET", "/v1/accounts/local/deployments/recon-dep")[1]
    assert dep["state"] == "READY" and dep["replicaCount"] == 1
    assert len(home.worker_pids()) == 2
