"""The trainer worker under hostile or faulty input: seq-id gaps, strict types, bounds, non-finite steps,
model admission, client sessions, health under load (real worker processes, nano model)."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp
import pytest
from trainer_procs import NANO, Trainer

from firetitan.client.training import TrainingClient
from firetitan.errors import NonFiniteError
from firetitan.types import AdamParams, Datum, ModelInput, TensorData


def datum(seq: list[int], **inputs: list[float]) -> Datum:
    loss_inputs: dict[str, TensorData] = {"target_tokens": TensorData.from_list(seq[1:], "int64")}
    loss_inputs.update({k: TensorData.from_list(v, "float32") for k, v in inputs.items()})
    return Datum(model_input=ModelInput.from_ints(seq[:-1]), loss_fn_inputs=loss_inputs)


GOOD = datum([5, 17, 42, 99, 7, 300])


async def post(session: aiohttp.ClientSession, url: str, route: str, body: Any, *,
               raw: str | None = None, content_type: str = "application/json") -> tuple[int, Any]:
    data = raw if raw is not None else json.dumps(body)
    async with session.post(f"{url}/api/v1/{route}", data=data, headers={"Content-Type": content_type}) as resp:
        return resp.status, await resp.json(content_type=None)


async def result(session: aiohttp.ClientSession, url: str, request_id: str) -> tuple[int, Any]:
    """Long-poll one future to its end (each poll holds up to 30 s)."""
    for _ in range(20):
        status, body = await post(session, url, "retrieve_future", {"request_id": request_id, "timeout": 30})
        if not (isinstance(body, dict) and body.get("type") == "try_again"):
            return status, body
    raise AssertionError(f"future {request_id} never finished")


@pytest.fixture
def model(trainer: Trainer) -> Any:
    tc = TrainingClient.create(trainer.url, NANO)
    yield tc
    tc.unload_model().result(30)
    tc.close()


async def test_a_refused_submission_consumes_its_seq_id_so_the_next_call_runs(trainer: Trainer, model) -> None:
    url, mid = trainer.url, model.model_id
    fb = {"model_id": mid, "session_id": "raw-1",
          "forward_backward_input": {"data": [GOOD.to_wire()], "loss_fn": "cross_entropy"}}
    async with aiohttp.ClientSession() as http:
        # Seq 1: a schema error (data is not a list). 400 naming the field, and a failed future.
        bad = {**fb, "seq_id": 1, "forward_backward_input": {"data": "nope", "loss_fn": "cross_entropy"}}
        status, body = await post(http, url, "forward_backward", bad)
        assert status == 400 and body["error"]["field"] == "forward_backward_input.data"
        assert (await result(http, url, body["request_id"]))[0] == 400
        # Retrying the same seq_id gets the same refusal, not a second consumption.
        again = await post(http, url, "forward_backward", bad)
        assert again[0] == 400 and again[1]["request_id"] == body["request_id"]
        # Seq 2 and 3 run: the gap at 1 does not hold them back.
        status, _ = await post(http, url, "forward_backward", {**fb, "seq_id": 2})
        assert status == 200
        status, step = await post(http, url, "optim_step", {"model_id": mid, "session_id": "raw-1", "seq_id": 3})
        assert status == 200
        status, out = await result(http, url, step["request_id"])
        assert status == 200 and out["metrics"]["accumulated_backwards"] == 1.0
        # Seq 4: refused by the batch check (token id outside the vocabulary), then seq 5 runs.
        oov = {**fb, "seq_id": 4, "forward_backward_input": {
            "data": [datum([5, 6, 99999]).to_wire()], "loss_fn": "cross_entropy"}}
        status, body = await post(http, url, "forward_backward", oov)
        assert status == 400 and body["error"]["field"] == "data[0].loss_fn_inputs.target_tokens"
        status, step = await post(http, url, "optim_step", {"model_id": mid, "session_id": "raw-1", "seq_id": 5})
        assert (await result(http, url, step["request_id"]))[1]["metrics"]["accumulated_backwards"] == 0.0
        # Loose seq ids are refused (they are unreadable, so nothing is consumed) ...
        for seq in (None, True, 10**30, "6", -1, 1.5):
            status, body = await post(http, url, "forward", {**fb, "seq_id": seq})
            assert (status, body["error"]["field"]) == (400, "seq_id"), seq
        # ... and the session continues at 6.
        status, fwd = await post(http, url, "forward", {**fb, "seq_id": 6})
        assert status == 200 and (await result(http, url, fwd["request_id"]))[0] == 200


async def test_out_of_range_adam_params_are_a_400_naming_the_field(trainer: Trainer, model) -> None:
    url, mid = trainer.url, model.model_id
    cases = [('{"learning_rate": Infinity}', "learning_rate"), ('{"learning_rate": NaN}', "learning_rate"),
             ('{"learning_rate": 1e308}', "learning_rate"), ('{"learning_rate": true}', "learning_rate"),
             ('{"learning_rate": "0.001"}', "learning_rate"), ('{"eps": 0}', "eps"), ('{"beta2": 1.0}', "beta2"),
             ('{"weight_decay": -1}', "weight_decay"), ('{"learning_rate": 1, "weight_decay": 5}', "weight_decay"),
             ('{"grad_clip_norm": Infinity}', "grad_clip_norm"), ('{"learning_rte": 0.1}', "learning_rte")]
    async with aiohttp.ClientSession() as http:
        for seq, (params, field) in enumerate(cases, start=1):
            raw = f'{{"model_id": "{mid}", "session_id": "adam", "seq_id": {seq}, "adam_params": {params}}}'
            status, body = await post(http, url, "optim_step", None, raw=raw)
            assert (status, body["error"]["field"]) == (400, f"adam_params.{field}"), params
    # The model was never touched: a normal step still works with finite numbers.
    model.forward_backward([GOOD], "cross_entropy").result(60)
    out = model.optim_step(AdamParams(learning_rate=1e-3)).result(60)
    assert out.metrics["step"] == 1.0 and out.metrics["grad_norm"] > 0


def test_a_non_finite_loss_is_refused_and_changes_nothing(trainer: Trainer, model) -> None:
    other = TrainingClient.create(trainer.url, NANO)
    try:
        n = GOOD.model_input.length
        # Sampler logprobs of -1e30: every importance ratio exp(lp - q) is infinite.
        poisoned = datum([*GOOD.model_input.to_ints(), 6], logprobs=[-1e30] * n, advantages=[1.0] * n)
        model.forward_backward([GOOD], "cross_entropy").result(60)
        with pytest.raises(NonFiniteError) as err:
            model.forward_backward([poisoned], "importance_sampling").result(60)
        assert err.value.field == "loss"
        step = model.optim_step(AdamParams(learning_rate=1e-2)).result(60)
        other.forward_backward([GOOD], "cross_entropy").result(60)
        clean = other.optim_step(AdamParams(learning_rate=1e-2)).result(60)
        assert step.metrics["accumulated_backwards"] == 1.0
        assert step.metrics["grad_norm"] == clean.metrics["grad_norm"]
        a = model.forward([GOOD]).result(60).loss_fn_outputs[0]["logprobs"].tolist()
        b = other.forward([GOOD]).result(60).loss_fn_outputs[0]["logprobs"].tolist()
        assert a == b
    finally:
        other.unload_model().result(30)
        other.close()


async def test_create_model_requires_and_bounds_its_fields(trainer: Trainer) -> None:
    cases = [({}, "base_model"), ({"base_model": None}, "base_model"), ({"base_model": "/etc"}, "base_model"),
             ({"base_model": "x" * 100_000}, "base_model"), ({"base_model": "../../etc"}, "base_model"),
             ({"base_model": NANO, "lora_config": {"rank": 10**9}}, "lora_config.rank"),
             ({"base_model": NANO, "lora_config": {"rank": True}}, "lora_config.rank"),
             ({"base_model": NANO, "lora_config": {"rank": 8, "init_method": "nora"}}, "lora_config.init_method"),
             ({"base_model": NANO, "seed": 2**64}, "seed")]
    async with aiohttp.ClientSession() as http:
        for body, field in cases:
            status, out = await post(http, trainer.url, "create_model", body)
            assert (status, out["error"]["field"]) == (400, field), body
        status, out = await post(http, trainer.url, "create_model", None, raw="base_model=x",
                                 content_type="text/plain")
        assert status == 415 and out["error"]["field"] == "Content-Type"
        status, out = await post(http, trainer.url, "create_model", None, raw="[" * 5000 + "]" * 5000)
        assert status == 400 and out["error"]["field"] == "body"
        async with http.get(f"{trainer.url}/health") as resp:
            assert resp.status == 200


async def test_client_sessions_heartbeats_and_telemetry_are_answered_in_the_sdk_shapes(trainer: Trainer) -> None:
    from tinker import types as tt

    async with aiohttp.ClientSession() as http:
        status, created = await post(http, trainer.url, "create_session", {
            "tags": ["a"], "user_metadata": {"k": "v"}, "sdk_version": "0.38.0", "type": "create_session"})
        assert status == 200
        session_id = tt.CreateSessionResponse.model_validate(created).session_id
        status, beat = await post(http, trainer.url, "session_heartbeat",
                                  {"session_id": session_id, "type": "session_heartbeat"})
        assert status == 200 and tt.SessionHeartbeatResponse.model_validate(beat).type == "session_heartbeat"
        status, body = await post(http, trainer.url, "session_heartbeat", {"session_id": None})
        assert (status, body["error"]["field"]) == (400, "session_id")
        events = {"events": [{"event": "x", "event_id": "1"}], "platform": "linux", "sdk_version": "0.38.0",
                  "session_id": session_id, "process_uuid": "u"}
        status, body = await post(http, trainer.url, "telemetry", events)
        assert (status, tt.TelemetryResponse.model_validate(body).status) == (200, "accepted")
        status, body = await post(http, trainer.url, "telemetry", None, raw="x" * (2 << 20))
        assert status == 413
        assert (await post(http, trainer.url, "client/config", {"sdk_version": "0.38.0"})) == (200, {})


async def test_health_answers_while_a_long_job_runs(trainer: Trainer, model) -> None:
    """The torch work and the parsing of a big batch run off the event loop: health is answered during
    them. (Latencies are printed, not asserted: the machine is shared.)"""
    big = [datum([(i * 7 + j) % 4000 + 3 for j in range(257)]) for i in range(48)]
    body = {"model_id": model.model_id, "session_id": "load", "seq_id": 1,
            "forward_backward_input": {"data": [d.to_wire() for d in big], "loss_fn": "cross_entropy"}}
    async with aiohttp.ClientSession() as http:
        submit = asyncio.ensure_future(post(http, trainer.url, "forward_backward", body))
        seen_busy, latencies, finished = False, [], False
        while not finished:
            t0 = time.monotonic()
            async with http.get(f"{trainer.url}/api/v1/healthz") as resp:
                health = await resp.json()
            latencies.append(time.monotonic() - t0)
            seen_busy = seen_busy or health["models"][model.model_id]["busy"]
            if submit.done():
                status, accepted = submit.result()
                assert status == 200
                status, out = await post(http, trainer.url, "retrieve_future",
                                         {"request_id": accepted["request_id"], "timeout": 0})
                finished = out.get("type") != "try_again"
            await asyncio.sleep(0.05)
        assert status == 200 and out["metrics"]["loss:sum"] > 0
    print(f"health checks during the job: {len(latencies)}, max {max(latencies):.3f}s")
    assert seen_busy, "health was never answered while the job ran"
