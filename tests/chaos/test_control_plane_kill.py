"""Chaos: kill -9 of the control plane under a training client; a new one adopts the workers."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest
from chaos_home import ACCT, NANO, ChaosHome, wait_until

from firetitan import types
from firetitan.client.service import FiretitanServiceClient
from firetitan.server.process import pid_alive, stop_pid

JOB_ID, DEP_ID = "chaos-cp-trainer", "chaos-cp-dep"
JOB, DEP = f"{ACCT}/rlorTrainerJobs/{JOB_ID}", f"{ACCT}/deployments/{DEP_ID}"
NO_ORPHAN_AFTER_S = 10.0


def _datum() -> types.Datum:
    tokens = list(range(10, 40))
    return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                       loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)})


def _service(**cleanup: object) -> FiretitanServiceClient:
    return FiretitanServiceClient.from_firetitan_config(
        base_model=NANO, trainer_job_id=JOB_ID, deployment_id=DEP_ID, replica_count=1, learning_rate=1e-2,
        **cleanup)


def _train(client: object, steps: int) -> None:
    for _ in range(steps):
        client.forward_backward([_datum()], "cross_entropy").result()  # type: ignore[attr-defined]
        client.optim_step(types.AdamParams(learning_rate=1e-2)).result()  # type: ignore[attr-defined]


@pytest.mark.slow
def test_kill9_of_the_control_plane_then_a_new_one_adopts_and_closes_clean(home: ChaosHome) -> None:
    first = _service(cleanup_trainer_on_close=False, cleanup_deployment_on_close=None)
    try:
        client = first.create_training_client()
        _train(client, 3)  # below the autosave interval: only adoption keeps these steps
        call = home.http()
        trainer_pid = call("GET", JOB)[1]["pid"]
        replica_pid = call("GET", DEP)[1]["replicas"][0]["pid"]
        [daemon] = home.control_plane_pids()
        os.kill(daemon, signal.SIGKILL)
        assert wait_until(lambda: not pid_alive(daemon), 10)
        time.sleep(1.0)
        assert pid_alive(trainer_pid) and pid_alive(replica_pid)  # workers outlive the crash (grace 15 s)
    finally:
        first.close()  # nothing to clean up: it only drops its sessions

    # A new client on the same home starts a new daemon, which recovers its records and adopts both.
    started = time.monotonic()
    second = _service()
    try:
        client = second.create_training_client()
        adopted_after = time.monotonic() - started
        call = home.http()
        job, dep = call("GET", JOB)[1], call("GET", DEP)[1]
        assert (job["state"], job["pid"]) == ("JOB_STATE_RUNNING", trainer_pid)
        assert dep["state"] == "READY" and [r["pid"] for r in dep["replicas"]] == [replica_pid]
        info = client.get_info().result()
        assert (info.step, info.restored_from_step) == (3, None)  # nothing lost, nothing restored
        _train(client, 1)
        assert client.get_info().result().step == 4
        saved = client.save_weights_for_sampler("after-adoption").result()
        sampler = second.create_deployment_sampler(model_path=saved.path)
        out = asyncio.run(sampler.sample_with_prompt_tokens([5, 6, 7], n=2, max_tokens=3))
        assert [c.policy_version for c in out] == [saved.path, saved.path]
        print(f"\nchaos control-plane kill: records recovered and workers adopted {adopted_after:.2f}s after a "
              "new client started (same trainer and replica pids, step kept)")
    finally:
        second.close()

    # Closing the (new) daemon stops every worker it adopted: nothing of this home is left.
    [daemon] = home.control_plane_pids()
    stop_pid(daemon, timeout=30)
    assert wait_until(lambda: home.worker_pids() == [] and home.control_plane_pids() == [], NO_ORPHAN_AFTER_S)
    assert not pid_alive(trainer_pid) and not pid_alive(replica_pid)
