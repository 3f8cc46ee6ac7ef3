"""Tinker-shaped types: JSON round trips, tensor conversions, compact wire form, real `tinker` objects."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from pydantic import BaseModel, ValidationError

from firetitan import types as ft

tinker = pytest.importorskip("tinker")

token = st.integers(min_value=0, max_value=2**31 - 1)
int64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
shapes = hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=5)


def json_round_trip(obj: BaseModel) -> BaseModel:
    return type(obj).model_validate_json(obj.model_dump_json())


# ---------------------------------------------------------------------------------------------- JSON


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(token, max_size=20), max_size=4))
def test_model_input_json_round_trip(chunks: list[list[int]]) -> None:
    mi = ft.ModelInput(chunks=[ft.EncodedTextChunk(tokens=c) for c in chunks])
    back = json_round_trip(mi)
    assert back == mi
    assert back.to_ints() == [t for c in chunks for t in c]
    assert back.length == sum(map(len, chunks))


@settings(max_examples=60, deadline=None)
@given(hnp.arrays(np.int64, shapes, elements=int64))
def test_int_tensor_json_round_trip(arr: np.ndarray) -> None:
    td = ft.TensorData.from_numpy(arr)
    back = json_round_trip(td)
    assert back == td
    np.testing.assert_array_equal(back.to_numpy(), arr)
    assert back.to_numpy().dtype == np.int64


@settings(max_examples=60, deadline=None)
@given(hnp.arrays(np.float32, shapes, elements=st.floats(width=32, allow_nan=False)))
def test_float_tensor_json_round_trip_is_exact(arr: np.ndarray) -> None:
    td = ft.TensorData.from_numpy(arr)
    back = json_round_trip(td)
    assert back.to_numpy().tobytes() == arr.tobytes()
    assert back.shape == list(arr.shape)


@settings(max_examples=60, deadline=None)
@given(
    st.one_of(
        hnp.arrays(np.int64, shapes, elements=int64),
        hnp.arrays(np.float32, shapes, elements=st.floats(width=32)),  # NaN/inf included
    )
)
def test_compact_b64_round_trip_is_bit_exact(arr: np.ndarray) -> None:
    td = ft.TensorData.from_numpy(arr)
    wire = td.to_wire(compact=True)
    assert set(wire) == {"b64", "dtype", "shape"}
    back = ft.TensorData.model_validate(json.loads(json.dumps(wire)))
    assert back.to_numpy().tobytes() == arr.tobytes()
    assert back.to_numpy().dtype == arr.dtype and back.shape == list(arr.shape)


def test_b64_is_little_endian_raw_bytes() -> None:
    wire = ft.TensorData.from_list([1, 256], "int64").to_wire(compact=True)
    assert base64.b64decode(wire["b64"]) == (1).to_bytes(8, "little") + (256).to_bytes(8, "little")


def test_non_finite_floats_survive_plain_json() -> None:
    td = ft.TensorData.from_list([float("inf"), float("-inf"), 1.5], "float32")
    assert json_round_trip(td) == td


def test_datum_round_trips_in_both_wire_forms() -> None:
    datum = ft.Datum(
        model_input=ft.ModelInput.from_ints([1, 2, 3]),
        loss_fn_inputs={"target_tokens": [2, 3, 4], "weights": [1.0, 0.5, 0.0]},
    )
    assert json_round_trip(datum) == datum
    compact = datum.to_wire(compact=True)
    assert "b64" in compact["loss_fn_inputs"]["weights"]
    assert ft.Datum.model_validate(json.loads(json.dumps(compact))) == datum
    plain = datum.to_wire()
    assert plain["loss_fn_inputs"]["target_tokens"] == {"data": [2, 3, 4], "dtype": "int64", "shape": [3]}


@pytest.mark.parametrize(
    "obj",
    [
        ft.AdamParams(learning_rate=3e-5, weight_decay=0.01, grad_clip_norm=1.0),
        ft.SamplingParams(max_tokens=16, seed=3, stop=["\n"], temperature=0.7, top_k=5, top_p=0.9),
        ft.SamplingParams(stop=[1, 2]),
        ft.SamplingParams(stop="END"),
        ft.SamplingParams(stop=[]),
        ft.SampledSequence(stop_reason="stop", tokens=[1, 2], logprobs=[-0.5, -1.25]),
        ft.SampleResponse(
            sequences=[ft.SampledSequence(stop_reason="length", tokens=[4])],
            prompt_logprobs=[None, -0.25],
            topk_prompt_logprobs=[None, [(3, -0.5), (7, -1.0)]],
        ),
        ft.ForwardBackwardOutput(
            loss_fn_output_type="ArrayRecord",
            loss_fn_outputs=[{"logprobs": ft.TensorData.from_list([-0.5, -2.0], "float32")}],
            metrics={"loss:sum": 2.5},
        ),
        ft.OptimStepResponse(metrics={"grad_norm:mean": 0.3}),
        ft.OptimStepResponse(),
        ft.SaveWeightsResponse(path="run-1/weights/0001"),
        ft.SaveWeightsForSamplerResponse(path="step_00010-abc123"),
        ft.LoadWeightsResponse(path="x", model_id="m"),
        ft.LoraConfig(rank=8, alpha=16, seed=1, train_unembed=False),
        ft.GetInfoResponse(
            model_id="m1",
            model_name="firetitan/tiny-qwen3",
            is_lora=True,
            lora_rank=4,
            model_data=ft.ModelData(arch="qwen3", model_name="firetitan/tiny-qwen3"),
        ),
    ],
    ids=lambda o: type(o).__name__,
)
def test_every_type_round_trips_through_json(obj: BaseModel) -> None:
    assert json_round_trip(obj) == obj


def test_defaults_match_tinker() -> None:
    adam = ft.AdamParams()
    assert (adam.learning_rate, adam.beta1, adam.beta2, adam.eps) == (1e-4, 0.9, 0.95, 1e-12)
    assert (adam.weight_decay, adam.grad_clip_norm) == (0.0, 0.0)
    sp = ft.SamplingParams()
    assert (sp.max_tokens, sp.seed, sp.stop, sp.temperature, sp.top_k, sp.top_p) == (
        None,
        None,
        None,
        1,
        -1,
        1,
    )
    lora = ft.LoraConfig(rank=4)
    assert lora.alpha is None and lora.effective_alpha == 32.0
    assert lora.train_unembed and lora.train_mlp and lora.train_attn
    # Same defaults as the real SDK, field by field.
    for ours, theirs in (
        (ft.AdamParams(), tinker.AdamParams()),
        (ft.SamplingParams(), tinker.SamplingParams()),
    ):
        for name in type(ours).model_fields:
            if hasattr(theirs, name):
                assert getattr(ours, name) == getattr(theirs, name), name


# ---------------------------------------------------------------------------------------------- model input


def test_model_input_helpers_return_new_objects() -> None:
    mi = ft.ModelInput.from_ints([1, 2])
    longer = mi.append_int(3)
    assert mi.to_ints() == [1, 2] and longer.to_ints() == [1, 2, 3]
    assert len(longer.chunks) == 1  # merged into the last text chunk
    two = mi.append(ft.EncodedTextChunk(tokens=[9]))
    assert two.to_ints() == [1, 2, 9] and len(two.chunks) == 2 and two.length == 3
    assert ft.ModelInput.empty().length == 0
    assert ft.ModelInput.empty().append_int(5).to_ints() == [5]


def test_unknown_chunk_type_is_rejected_naming_the_field() -> None:
    with pytest.raises(ValidationError) as info:
        ft.ModelInput.model_validate({"chunks": [{"type": "image", "tokens": [1]}]})
    assert info.value.errors()[0]["loc"] == ("chunks", 0, "type")


# ---------------------------------------------------------------------------------------------- tensors


@pytest.mark.parametrize(
    ("np_dtype", "expected"),
    [
        (np.int32, "int64"),
        (np.int64, "int64"),
        (np.uint8, "int64"),
        (np.bool_, "int64"),
        (np.float16, "float32"),
        (np.float32, "float32"),
        (np.float64, "float32"),
    ],
)
def test_from_numpy_maps_kinds_and_keeps_shape(np_dtype: type, expected: str) -> None:
    arr = np.arange(6).reshape(2, 3).astype(np_dtype)
    td = ft.TensorData.from_numpy(arr)
    assert td.dtype == expected and td.shape == [2, 3]
    out = td.to_numpy()
    assert out.shape == (2, 3) and out.dtype == ft._NP_DTYPES[expected]
    np.testing.assert_array_equal(out, arr.astype(out.dtype))
    assert td.tolist() == arr.astype(out.dtype).tolist()


@pytest.mark.parametrize(
    ("torch_dtype", "expected"),
    [
        (torch.int64, torch.int64),
        (torch.int32, torch.int64),
        (torch.bool, torch.int64),
        (torch.float32, torch.float32),
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float32),
    ],
)
def test_torch_conversion_keeps_shape_and_widens(torch_dtype: torch.dtype, expected: torch.dtype) -> None:
    t = (torch.arange(12) % 5).reshape(3, 4).to(torch_dtype)
    td = ft.TensorData.from_torch(t)
    back = td.to_torch()
    assert back.dtype == expected and back.shape == (3, 4)
    assert torch.equal(back, t.to(expected))


def test_torch_conversion_of_non_contiguous_and_grad_tensors() -> None:
    t = torch.randn(4, 3, requires_grad=True).t()  # transposed view, needs grad
    back = ft.TensorData.from_torch(t).to_torch()
    assert back.shape == (3, 4) and torch.equal(back, t.detach())


def test_to_numpy_returns_a_copy() -> None:
    td = ft.TensorData.from_list([1, 2, 3], "int64")
    td.to_numpy()[0] = 99
    assert td.data == [1, 2, 3]


@pytest.mark.parametrize(
    ("payload", "needle"),
    [
        ({"data": [1, 2, 3], "dtype": "int64", "shape": [2]}, "shape"),
        ({"data": [1.5], "dtype": "int64"}, "non-integer"),
        ({"data": [[1, 2], [3]], "dtype": "int64"}, "rectangular"),
        ({"dtype": "float32", "shape": [1]}, "data"),
        ({"b64": "!!notbase64", "dtype": "float32"}, "b64"),
        ({"b64": base64.b64encode(b"123").decode(), "dtype": "float32"}, "b64"),
        ({"data": [1], "dtype": "float64"}, "dtype"),
    ],
)
def test_bad_tensors_name_the_problem(payload: dict, needle: str) -> None:
    with pytest.raises(ValidationError) as info:
        ft.TensorData.model_validate(payload)
    assert needle in str(info.value)


def test_tensor_without_shape_is_flat_and_nested_lists_keep_shape() -> None:
    flat = ft.TensorData.model_validate({"data": [1, 2, 3], "dtype": "int64"})
    assert flat.shape is None and flat.to_numpy().shape == (3,)
    nested = ft.TensorData.model_validate({"data": [[1, 2], [3, 4]], "dtype": "float32"})
    assert nested.shape == [2, 2] and nested.data == [1.0, 2.0, 3.0, 4.0]


# ---------------------------------------------------------------------------------------------- datum


@pytest.mark.parametrize("kind", ["list", "numpy", "torch"])
def test_datum_coerces_values_by_key(kind: str) -> None:
    raw = {"target_tokens": [5, 6, 7], "weights": [1, 1, 0], "advantages": [0.5, -1.0, 2.0]}
    convert = {"list": list, "numpy": np.array, "torch": torch.tensor}[kind]
    datum = ft.Datum(
        model_input=ft.ModelInput.from_ints([4, 5, 6]), loss_fn_inputs={k: convert(v) for k, v in raw.items()}
    )
    inputs = datum.loss_fn_inputs
    assert inputs["target_tokens"].dtype == "int64"
    assert inputs["weights"].dtype == "float32" and inputs["advantages"].dtype == "float32"
    assert inputs["weights"].data == [1.0, 1.0, 0.0]
    assert all(td.shape == [3] for td in inputs.values())


def test_datum_keeps_2d_targets() -> None:
    datum = ft.Datum(
        model_input=ft.ModelInput.from_ints([1, 2]),
        loss_fn_inputs={"target_tokens": [[1, 2], [3, 4]], "weights": np.ones((2, 2))},
    )
    assert datum.loss_fn_inputs["target_tokens"].shape == [2, 2]
    assert datum.loss_fn_inputs["weights"].to_torch().shape == (2, 2)


# ---------------------------------------------------------------------------------------------- tinker


def _tinker_datum():
    return tinker.Datum(
        model_input=tinker.ModelInput.from_ints([1, 2, 3]),
        loss_fn_inputs={"target_tokens": [2, 3, 4], "weights": torch.tensor([1.0, 0.5, 0.0])},
    )


def test_real_tinker_datum_is_accepted() -> None:
    ours = ft.Datum.model_validate(_tinker_datum())
    assert ours.model_input.to_ints() == [1, 2, 3]
    assert ours.loss_fn_inputs["target_tokens"].dtype == "int64"
    assert ours.loss_fn_inputs["target_tokens"].data == [2, 3, 4]
    assert ours.loss_fn_inputs["weights"].data == [1.0, 0.5, 0.0]
    assert ft.coerce_datum(_tinker_datum()) == ours


def test_real_tinker_2d_sparse_tensor_is_densified() -> None:
    targets = torch.tensor([[1, 0, 0], [0, 0, 2]])
    datum = tinker.Datum(
        model_input=tinker.ModelInput.from_ints([1, 2]), loss_fn_inputs={"target_tokens": targets}
    )
    ours = ft.Datum.model_validate(datum)
    assert torch.equal(ours.loss_fn_inputs["target_tokens"].to_torch(), targets)


def test_real_tinker_params_and_inputs_are_accepted() -> None:
    adam = ft.coerce_adam_params(tinker.AdamParams(learning_rate=2e-5, beta2=0.99, eps=1e-8))
    assert (adam.learning_rate, adam.beta2, adam.eps, adam.beta1) == (2e-5, 0.99, 1e-8, 0.9)
    sp = ft.coerce_sampling_params(tinker.SamplingParams(max_tokens=7, stop=[3], temperature=0.5))
    assert (sp.max_tokens, sp.stop, sp.temperature) == (7, [3], 0.5)
    mi = ft.coerce_model_input(tinker.ModelInput.from_ints([9, 8]))
    assert isinstance(mi, ft.ModelInput) and mi.to_ints() == [9, 8]
    td = ft.TensorData.model_validate(
        tinker.TensorData.from_numpy(np.arange(4, dtype=np.float32).reshape(2, 2))
    )
    assert td.shape == [2, 2] and td.dtype == "float32"


def test_fields_typed_model_input_accept_tinker_objects() -> None:
    class Request(BaseModel):
        prompt: ft.ModelInput
        params: ft.SamplingParams

    req = Request(prompt=tinker.ModelInput.from_ints([1, 2]), params=tinker.SamplingParams(max_tokens=3))
    assert req.prompt.to_ints() == [1, 2] and req.params.max_tokens == 3


def test_coercion_helpers() -> None:
    assert ft.coerce_adam_params(None) == ft.AdamParams()
    assert ft.coerce_adam_params({"learning_rate": 1e-3}).learning_rate == 1e-3
    assert ft.coerce_model_input([1, 2]).to_ints() == [1, 2]
    assert ft.coerce_sampling_params(None) == ft.SamplingParams()


def test_params_reject_typos_and_bad_values_naming_the_field() -> None:
    with pytest.raises(ValidationError) as info:
        ft.AdamParams(learning_rte=1e-4)
    assert info.value.errors()[0]["loc"] == ("learning_rte",)
    with pytest.raises(ValidationError) as info:
        ft.SamplingParams(top_p=0)
    assert info.value.errors()[0]["loc"] == ("top_p",)
    with pytest.raises(ValidationError):
        ft.SamplingParams(stop=[1, "a"])
    with pytest.raises(ValidationError):
        ft.LoraConfig(rank=0)


def test_pickle_and_copy_keep_tensors() -> None:
    import copy
    import pickle

    datum = ft.Datum(model_input=ft.ModelInput.from_ints([1, 2]), loss_fn_inputs={"weights": np.ones((2, 3))})
    for clone in (pickle.loads(pickle.dumps(datum)), copy.deepcopy(datum), datum.model_copy(deep=True)):
        assert clone == datum
        assert clone.loss_fn_inputs["weights"].to_numpy().shape == (2, 3)


@pytest.mark.parametrize("bad, field", [
    ({"learning_rate": float("inf")}, "learning_rate"), ({"learning_rate": float("nan")}, "learning_rate"),
    ({"learning_rate": 1e308}, "learning_rate"), ({"learning_rate": True}, "learning_rate"),
    ({"learning_rate": "1e-3"}, "learning_rate"), ({"beta1": 1.0}, "beta1"), ({"beta2": -0.1}, "beta2"),
    ({"eps": 0.0}, "eps"), ({"eps": 1e-300}, "eps"), ({"weight_decay": -1.0}, "weight_decay"),
    ({"learning_rate": 0.5, "weight_decay": 3.0}, "weight_decay"), ({"grad_clip_norm": float("inf")}, "grad_clip_norm"),
])
def test_adam_params_out_of_range_name_the_field(bad: dict, field: str) -> None:
    from pydantic import ValidationError

    from firetitan.types import AdamParams

    with pytest.raises(ValidationError) as err:
        AdamParams.model_validate(bad)
    assert err.value.errors()[0]["loc"] == (field,)


def test_adam_params_and_lora_config_accept_sane_and_official_values() -> None:
    import tinker

    from firetitan.types import MAX_LORA_RANK, AdamParams, LoraConfig

    assert AdamParams(learning_rate=1, weight_decay=1).learning_rate == 1.0  # ints are numbers
    assert AdamParams.model_validate(tinker.AdamParams(learning_rate=3e-4)).learning_rate == 3e-4
    assert AdamParams(emit_grad_norm_metrics="basic").emit_grad_norm_metrics == "basic"
    assert LoraConfig(rank=MAX_LORA_RANK, init_method="kaiming").rank == MAX_LORA_RANK
    for bad in ({"rank": MAX_LORA_RANK + 1}, {"rank": True}, {"rank": 8, "alpha": float("inf")},
                {"rank": 8, "init_method": "nora"}):
        with pytest.raises(ValueError):
            LoraConfig.model_validate(bad)


def test_token_ids_are_bounded() -> None:
    from firetitan.types import ModelInput

    assert ModelInput.from_ints([0, 2**31 - 1]).length == 2
    for bad in (-1, 2**31, 10**20):
        with pytest.raises(ValueError):
            ModelInput.from_ints([bad])
