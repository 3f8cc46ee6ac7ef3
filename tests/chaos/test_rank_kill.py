"""Chaos: kill -9 of rank 1 of a 2-rank data-parallel trainer job in the middle of a forward_backward."""

from __future__ import annotations

import os
import signal
import time

import psutil
import pytest
from chaos_home import ACCT, NANO, ChaosHome, wait_until

from firetitan import types
from firetitan.client.service import FiretitanServiceClient
from firetitan.errors import WorkerCrashedError

JOB_ID = "chaos-ranks"
JOB = f"{ACCT}/rlorTrainerJobs/{JOB_ID}"
# An e2e acceptance bound, not a unit-test timing (see test_trainer_kill.py): rank 0 sees its child
# exit within 0.1 s and fails the pending future; 30 s leaves room for a loaded CI machine.
CRASH_REPORT_BOUND_S = 30.0


def _datum(length: int, offset: int = 0) -> types.Datum:
    tokens = [10 + (offset + i) % 200 for i in range(length + 1)]
    return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                       loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * length})


@pytest.mark.slow
def test_killing_rank_1_fails_the_pending_future_typed_and_leaves_no_process(home: ChaosHome) -> None:
    service = FiretitanServiceClient.from_firetitan_config(
        base_model=NANO, trainer_job_id=JOB_ID, world_size=2, learning_rate=1e-2, create_deployment=False,
        cleanup_trainer_on_close=False)
    try:
        client = service.create_training_client()
        job = home.http()("GET", JOB)[1]
        assert job["state"] == "JOB_STATE_RUNNING" and job["trainingConfig"]["worldSize"] == 2, job
        rank0 = psutil.Process(job["pid"])
        ranks = rank0.children(recursive=True)
        assert len(ranks) == 1 and "firetitan.server.trainer.distributed.rank" in " ".join(ranks[0].cmdline())
        client.forward_backward([_datum(16), _datum(12)], "cross_entropy").result()
        client.optim_step(types.AdamParams(learning_rate=1e-2)).result()
        assert client.get_info().result().step == 1

        big = [_datum(512, offset=i) for i in range(96)]
        future = client.forward_backward(big, "cross_entropy")
        time.sleep(1.5)
        assert not future.done(), "the big forward_backward finished before the kill: make it bigger"
        os.kill(ranks[0].pid, signal.SIGKILL)
        killed = time.monotonic()
        with pytest.raises(WorkerCrashedError) as err:
            future.result(timeout=120)
        reported_after = time.monotonic() - killed
        print(f"\nrank kill: pending future failed {reported_after:.2f}s after kill -9 of rank 1: {err.value}")
        assert reported_after < CRASH_REPORT_BOUND_S
        # Either the future rank 0 failed, or (had it already exited) the gateway's 409 with its log tail.
        assert "trainer rank 1 of 2" in str(err.value), err.value

        failed = home.wait_for(JOB, lambda j: j["state"] != "JOB_STATE_RUNNING", timeout=30)
        assert failed["state"] == "JOB_STATE_FAILED"
        message = failed["status"]["message"]
        assert "trainer rank 1 of 2" in message and "exited with code -9" in message, message
    finally:
        service.close()
    # Nothing of the job is left: rank 0 exited non-zero, rank 1 was reaped.
    assert wait_until(lambda: not rank0.is_running() or rank0.status() == psutil.STATUS_ZOMBIE, timeout=10)
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in ranks)
    status, body = home.http()("DELETE", JOB)
    assert status == 200, body
    assert home.worker_pids() == []
