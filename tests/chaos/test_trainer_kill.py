"""Chaos: kill -9 of the trainer worker in the middle of a long forward_backward, then a reconnect."""

from __future__ import annotations

import os
import signal
import time
import warnings

import pytest
from chaos_home import ACCT, NANO, ChaosHome

from firetitan import types
from firetitan.client.service import FiretitanServiceClient
from firetitan.errors import WorkerCrashedError

JOB_ID = "chaos-trainer"
JOB = f"{ACCT}/rlorTrainerJobs/{JOB_ID}"
AUTOSAVE_EVERY = 10  # the trainer's default `--autosave-every`: the control plane passes no other
# An e2e acceptance bound, not a unit-test timing: the pending future must fail within seconds of the
# kill. Measured ~1-3 s (the control plane's health check notices the exit, the long poll returns 409
# "not running", the SDK maps it to WorkerCrashedError); 30 s leaves room for a loaded CI machine.
CRASH_REPORT_BOUND_S = 30.0


def _datum(length: int, offset: int = 0) -> types.Datum:
    tokens = [10 + (offset + i) % 200 for i in range(length + 1)]
    return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                       loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * length})


def _service() -> FiretitanServiceClient:
    return FiretitanServiceClient.from_firetitan_config(
        base_model=NANO, trainer_job_id=JOB_ID, learning_rate=1e-2, create_deployment=False,
        cleanup_trainer_on_close=False)


@pytest.mark.slow
def test_kill9_mid_forward_backward_fails_typed_and_reconnect_restores(home: ChaosHome) -> None:
    service = _service()
    try:
        client = service.create_training_client()
        small = [_datum(16)]
        for _ in range(AUTOSAVE_EVERY + 2):  # autosaved at step 10; steps 11 and 12 are not
            client.forward_backward(small, "cross_entropy").result()
            client.optim_step(types.AdamParams(learning_rate=1e-2)).result()
        assert client.get_info().result().step == AUTOSAVE_EVERY + 2
        job = home.http()("GET", JOB)[1]
        pid = job["pid"]

        # A batch big enough to keep the trainer busy for several seconds on one thread.
        big = [_datum(512, offset=i) for i in range(96)]
        started = time.monotonic()
        future = client.forward_backward(big, "cross_entropy")
        time.sleep(1.5)  # well inside the computation (it takes longer than this: asserted below)
        assert not future.done(), "the big forward_backward finished before the kill: make it bigger"
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        with pytest.raises(WorkerCrashedError) as err:
            future.result(timeout=120)
        reported_after = time.monotonic() - killed
        print(f"\nchaos trainer kill: pending future failed {reported_after:.2f}s after kill -9 "
              f"({killed - started:.2f}s into the call): {err.value}")
        assert reported_after < CRASH_REPORT_BOUND_S

        # The control plane marks the job FAILED (it does not restart a trainer on its own) and keeps
        # the end of the worker's log in the status.
        failed = home.wait_for(JOB, lambda j: j["state"] != "JOB_STATE_RUNNING", timeout=30)
        assert failed["state"] == "JOB_STATE_FAILED"
        message = failed["status"]["message"]
        assert "exited with code -9" in message and "last log lines:" in message, message
    finally:
        service.close()

    # Reconnect by id: the job is resumed, the trainer restores its autosave of step 10, and the
    # client is told that two steps were lost (11 and 12), with a warning, not silence.
    again = _service()
    try:
        with warnings.catch_warnings(record=True) as caught:  # the re-attach itself warns
            warnings.simplefilter("always")
            client = again.create_training_client()
            info = client.get_info().result()
        assert home.http()("GET", JOB)[1]["pid"] != pid
        assert (info.step, info.restored_from_step, info.steps_lost) == (AUTOSAVE_EVERY, AUTOSAVE_EVERY, 2)
        assert any("2 step(s)" in str(w.message) for w in caught), [str(w.message) for w in caught]
        client.forward_backward([_datum(16)], "cross_entropy").result()
        client.optim_step(types.AdamParams(learning_rate=1e-2)).result()
        assert client.get_info().result().step == AUTOSAVE_EVERY + 1
    finally:
        again.close()
    status, body = home.http()("DELETE", JOB)
    assert status == 200, body
    assert home.worker_pids() == []
