"""`provisioner: ray`: a trainer whose actor is killed becomes FAILED with the reason and its log tail,
as a killed local trainer does (tests/chaos/test_trainer_kill.py); resuming starts it on a new actor and
deleting it leaves no actor behind."""

from __future__ import annotations

import pytest
import ray
from ray_home import ACCT, NAMESPACE, NANO, RayHome, firetitan_actors, wait_until

from firetitan import types
from firetitan.client.service import FiretitanServiceClient
from firetitan.server.process import pid_alive

JOB_ID = "ray-trainer"
JOB = f"{ACCT}/rlorTrainerJobs/{JOB_ID}"


def _datum(length: int) -> types.Datum:
    tokens = [10 + i % 200 for i in range(length + 1)]
    return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                       loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * length})


def _service() -> FiretitanServiceClient:
    return FiretitanServiceClient.from_firetitan_config(
        base_model=NANO, trainer_job_id=JOB_ID, learning_rate=1e-2, create_deployment=False,
        cleanup_trainer_on_close=False)


def _train_one_step(service: FiretitanServiceClient) -> int:
    client = service.create_training_client()
    client.forward_backward([_datum(16)], "cross_entropy").result()
    client.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    return client.get_info().result().step


@pytest.mark.slow
def test_ray_kill_of_a_trainer_actor_fails_the_job_and_resume_uses_a_new_actor(home: RayHome) -> None:
    service = _service()
    try:
        assert _train_one_step(service) == 1
        job = home.http()("GET", JOB)[1]
        pid = job["pid"]
        (actor,) = [a for a in firetitan_actors() if a.endswith(f":trainer:local/{JOB_ID}")]
        ray.kill(ray.get_actor(actor, namespace=NAMESPACE))
        failed = home.wait_for(JOB, lambda j: j["state"] != "JOB_STATE_RUNNING", timeout=60)
    finally:
        service.close()
    assert failed["state"] == "JOB_STATE_FAILED"
    message = failed["status"]["message"]
    assert f"pid {pid}" in message and "its Ray actor" in message and "died" in message, message
    assert "last log lines:" in message, message
    assert wait_until(lambda: not pid_alive(pid), timeout=30)
    assert firetitan_actors() == []

    again = _service()  # reconnect by id: the job resumes on a new actor
    try:
        _train_one_step(again)
        assert home.http()("GET", JOB)[1]["pid"] != pid
        assert [a for a in firetitan_actors() if a.endswith(f":trainer:local/{JOB_ID}")]
    finally:
        again.close()
    # The SDK deletes only a job it created (this one was reattached by id): delete it here.
    status, body = home.http()("DELETE", JOB)
    assert status == 200, body
    assert wait_until(lambda: firetitan_actors() == [], timeout=30), firetitan_actors()
    assert wait_until(lambda: home.worker_pids() == [], timeout=30)
