"""A trainer that dies mid-call surfaces as WorkerCrashedError, not as a state conflict.

The control plane's trainer gateway is the remote service here (aioresponses), answering as it does
for a job that is no longer running: 409 ConflictError on `rlorTrainerJobId`.
"""

from __future__ import annotations

import pytest
from aioresponses import aioresponses

from firetitan.client.training import TrainingClient
from firetitan.errors import ConflictError, WorkerCrashedError

GATEWAY = "http://cp.invalid/v1/accounts/local/rlorTrainerJobs/j1/trainer"
NOT_RUNNING = {"error": {"type": "ConflictError", "field": "rlorTrainerJobId",
                         "message": "trainer job 'accounts/local/rlorTrainerJobs/j1' is not running (state FAILED)"}}


def test_job_not_running_mid_call_is_a_crash() -> None:
    tc = TrainingClient(GATEWAY, "m1", poll_seconds=1.0)
    with aioresponses() as m:
        m.post(f"{GATEWAY}/api/v1/forward_backward", status=200, payload={"request_id": "r1"})
        m.post(f"{GATEWAY}/api/v1/retrieve_future", status=409, payload=NOT_RUNNING)
        fut = tc.forward_backward([{"model_input": {"chunks": [{"type": "encoded_text", "tokens": [1, 2]}]},
                                    "loss_fn_inputs": {"target_tokens": [2, 3], "weights": [1.0, 1.0]}}],
                                   "cross_entropy")
        with pytest.raises(WorkerCrashedError) as info:
            fut.result(timeout=30)
        assert "not running" in info.value.message and info.value.field == "rlorTrainerJobId"


def test_other_conflicts_stay_conflicts() -> None:
    tc = TrainingClient(GATEWAY, "m1", poll_seconds=1.0)
    with aioresponses() as m:
        m.post(f"{GATEWAY}/api/v1/save_weights", status=409,
               payload={"error": {"type": "ConflictError", "field": "path", "message": "state 'x' exists"}})
        with pytest.raises(ConflictError) as info:
            tc.save_state("x").result(timeout=30)
    assert not isinstance(info.value, WorkerCrashedError)
