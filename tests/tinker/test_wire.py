"""The gateway's protobuf translation, checked against the tinker SDK's own encoder and decoder."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from firetitan.server.tinker_gateway import wire
from firetitan.server.tinker_gateway.futures import Failure, FutureTable, Outcome
from firetitan.server.tinker_gateway.gateway import parse_tinker_path
from firetitan.types import TensorData

tinker = pytest.importorskip("tinker")
from tinker.proto.request_conv import forward_backward_request_to_proto  # noqa: E402
from tinker.proto.response_conv import (  # noqa: E402
    deserialize_forward_backward_output,
    deserialize_sample_response,
)

TOPK = np.zeros((6, 8), dtype=np.int64)
TOPK[0, 1], TOPK[2, 5] = 7, 9


def _sdk_request(loss_fn_config: dict[str, float | str] | None) -> bytes:
    t = tinker.types
    dense = t.Datum(model_input=t.ModelInput.from_ints([3, 4, 5]),
                    loss_fn_inputs={"target_tokens": [4, 5, 6], "weights": [1.0, 0.5, 0.0]})
    sparse_tt = t.TensorData.from_torch_sparse(torch.tensor(TOPK))
    assert sparse_tt.sparse_crow_indices is not None  # the SDK really sends CSR here
    sparse = t.Datum(model_input=t.ModelInput.from_ints([1, 2, 3, 4, 5, 6]),
                     loss_fn_inputs={"target_tokens": sparse_tt, "weights": np.ones((6, 8), dtype=np.float32)})
    req = t.ForwardBackwardRequest(
        model_id="s:train:0", seq_id=7,
        forward_backward_input=t.ForwardBackwardInput(data=[dense, sparse], loss_fn="cross_entropy",
                                                      loss_fn_config=loss_fn_config))
    return bytes(forward_backward_request_to_proto(req).SerializeToString())


def test_forward_backward_request_from_the_sdk_encoder() -> None:
    body, forward_only = wire.forward_backward_from_proto(_sdk_request({"clip": 0.2, "mode": "x"}))
    assert not forward_only
    assert (body["model_id"], body["seq_id"]) == ("s:train:0", 7)
    fb = body["forward_backward_input"]
    assert fb["loss_fn"] == "cross_entropy" and fb["loss_fn_config"] == {"clip": pytest.approx(0.2), "mode": "x"}
    first, second = fb["data"]
    assert first["model_input"]["chunks"] == [{"type": "encoded_text", "tokens": [3, 4, 5]}]
    assert first["loss_fn_inputs"]["target_tokens"] == {"data": [4, 5, 6], "dtype": "int64", "shape": [3]}
    assert first["loss_fn_inputs"]["weights"]["data"] == [1.0, 0.5, 0.0]
    # The SDK sends a sparse 2-D target as CSR; the worker gets it dense.
    tt = second["loss_fn_inputs"]["target_tokens"]
    assert tt["shape"] == [6, 8] and tt["dtype"] == "int64"
    assert np.array_equal(np.array(tt["data"]).reshape(6, 8), TOPK)
    assert wire.proto_address(_sdk_request(None)) == ("s:train:0", 7)


def test_garbage_is_a_named_400_and_has_no_address() -> None:
    with pytest.raises(Exception, match="ForwardBackwardRequest"):
        wire.forward_backward_from_proto(b"\xff\xff\xff")
    assert wire.proto_address(b"\xff\xff\xff") == (None, None)


def test_forward_backward_output_decodes_with_the_sdk() -> None:
    one = TensorData.from_numpy(np.array([-1.5, -2.25, -0.125], dtype=np.float32))
    two = TensorData.from_numpy(np.array([-3.0], dtype=np.float32))
    body = {"loss_fn_output_type": "ArrayRecord", "metrics": {"loss:sum": 6.875, "ratio:mean": 1.0},
            "loss_fn_outputs": [{"logprobs": one.to_wire()}, {"logprobs": two.to_wire(compact=True)}]}
    out = deserialize_forward_backward_output(wire.forward_backward_output_to_proto(body))
    assert out.metrics == {"loss:sum": 6.875, "ratio:mean": 1.0}
    assert [o["logprobs"].tolist() for o in out.loss_fn_outputs] == [[-1.5, -2.25, -0.125], [-3.0]]
    assert out.loss_fn_outputs[0]["logprobs"].shape == [3]


def test_sample_response_decodes_with_the_sdk() -> None:
    seqs = [{"tokens": [5, 6], "logprobs": [-0.5, -1.0], "stop_reason": "length"},
            {"tokens": [7], "logprobs": [-0.25], "stop_reason": "stop"}]
    out = deserialize_sample_response(wire.sample_response_to_proto(seqs, [None, -1.5, -2.0]))
    assert [list(s.tokens) for s in out.sequences] == [[5, 6], [7]]
    assert [s.stop_reason for s in out.sequences] == ["length", "stop"]
    assert list(out.sequences[0].logprobs) == [-0.5, -1.0]
    assert out.prompt_logprobs == [None, -1.5, -2.0]


def test_tinker_paths() -> None:
    assert parse_tinker_path("tinker://abc:train:0/sampler_weights/s1", "sampler_weights") == ("abc:train:0", "s1")
    for bad in ("tinker://abc/weights/s1", "s1", "tinker://abc/sampler_weights/", "tinker://a/b/c/d"):
        with pytest.raises(Failure, match="sampler_weights"):
            parse_tinker_path(bad, "sampler_weights")


def test_future_table_keeps_a_bounded_number_of_finished_results() -> None:
    async def scenario() -> None:
        table = FutureTable(retention=3)

        async def done(i: int) -> Outcome:
            return Outcome(json={"i": i})

        ids = [table.spawn(done(i)) for i in range(5)]
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        table.spawn(done(99))
        assert len(table._tasks) <= 4
        assert (await table.get(ids[-1])).json == {"i": 4}
        with pytest.raises(Exception, match="unknown or its result has expired"):
            table.get(ids[0])
        with pytest.raises(Failure, match="bad"):
            await table.get(table.failed("bad"))

    asyncio.run(scenario())


def test_generated_api_key_is_accepted_by_the_tinker_sdk(tmp_path: object) -> None:
    from pathlib import Path

    from tinker.lib._auth_token_provider import ApiKeyAuthProvider

    from firetitan.server.control_plane.home import HomeLayout, load_or_create_api_key

    key = load_or_create_api_key(HomeLayout(Path(str(tmp_path)) / "home"))
    assert key.startswith("tml-")
    assert asyncio.run(ApiKeyAuthProvider(api_key=key).get_token()) == key
