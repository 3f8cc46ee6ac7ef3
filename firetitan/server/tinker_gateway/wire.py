"""Translate the tinker SDK's protobuf messages to and from the trainer and deployment workers' JSON."""

from __future__ import annotations

from typing import Any

import numpy as np

from firetitan.errors import InvalidRequestError
from firetitan.types import TensorData

PROTO = "application/x-protobuf"

_NP = {"float32": np.float32, "int64": np.int64}


def _pb() -> Any:
    # The protobuf classes ship inside the `tinker` package (a runtime dependency of this gateway).
    from tinker.proto import tinker_public_pb2

    return tinker_public_pb2


def _tensor_json(msg: Any) -> dict[str, Any]:
    pb = _pb()
    names = {pb.DTYPE_FLOAT32: ("float32", np.float32), pb.DTYPE_INT64: ("int64", np.int64),
             pb.DTYPE_INT32: ("int64", np.int32), pb.DTYPE_BFLOAT16: ("float32", np.uint16)}
    if msg.dtype not in names:
        raise InvalidRequestError(f"loss_fn_inputs: tensor dtype {msg.dtype} is not supported "
                                  "(float32, int64, int32 or bfloat16)", field="loss_fn_inputs")
    dtype, np_dtype = names[msg.dtype]
    shape = list(msg.shape)
    raw = msg.sparse_csr.values if msg.HasField("sparse_csr") else msg.dense
    values = np.frombuffer(raw, dtype=np_dtype)
    if msg.dtype == pb.DTYPE_BFLOAT16:
        values = (values.astype(np.uint32) << 16).view(np.float32)
    values = values.astype(_NP[dtype])
    if msg.HasField("sparse_csr"):
        # Densify CSR: rows from crow, columns from col; unlisted cells are 0.
        crow = np.frombuffer(msg.sparse_csr.crow_indices, dtype=np.int64)
        col = np.frombuffer(msg.sparse_csr.col_indices, dtype=np.int64)
        if len(shape) != 2:
            raise InvalidRequestError(f"loss_fn_inputs: a sparse tensor must be 2-D, got shape {shape}",
                                      field="loss_fn_inputs")
        dense = np.zeros(shape, dtype=_NP[dtype])
        rows = np.repeat(np.arange(shape[0]), np.diff(crow))
        dense[rows, col] = values
        values = dense.reshape(-1)
    if not shape:
        shape = [int(values.size)]
    return {"data": values.tolist(), "dtype": dtype, "shape": shape}


def proto_address(body: bytes) -> tuple[str | None, int | None]:
    """(model_id, seq_id) of a `ForwardBackwardRequest` whose content may be invalid; Nones if unreadable."""
    from google.protobuf.message import DecodeError

    msg = _pb().ForwardBackwardRequest()
    try:
        msg.ParseFromString(body)
    except DecodeError:
        return None, None
    return (msg.model_id or None), msg.seq_id


def forward_backward_from_proto(body: bytes) -> tuple[dict[str, Any], bool]:
    """A `ForwardBackwardRequest` protobuf -> (the worker's JSON body, forward_only)."""
    from google.protobuf.message import DecodeError

    msg = _pb().ForwardBackwardRequest()
    try:
        msg.ParseFromString(body)
    except DecodeError as exc:
        raise InvalidRequestError(f"body: not a valid ForwardBackwardRequest protobuf ({exc})",
                                  field="body") from exc
    data = []
    for i, datum in enumerate(msg.data):
        chunks = []
        for chunk in datum.model_input:
            kind = chunk.WhichOneof("chunk") if "chunk" in chunk.DESCRIPTOR.oneofs_by_name else None
            if kind is None:
                kind = next((f.name for f, _ in chunk.ListFields()), None)
            if kind != "encoded_text":
                raise InvalidRequestError(f"data[{i}].model_input: only encoded_text chunks are supported, "
                                          f"got {kind!r}", field=f"data[{i}].model_input")
            tokens = np.frombuffer(chunk.encoded_text.tokens, dtype=np.int32)
            chunks.append({"type": "encoded_text", "tokens": tokens.tolist()})
        inputs = {name: _tensor_json(t) for name, t in datum.loss_fn_inputs.items()}
        data.append({"model_input": {"chunks": chunks}, "loss_fn_inputs": inputs})
    config: dict[str, float | str] = {k: float(v) for k, v in msg.loss_fn_config.items()}
    for key, value in msg.loss_fn_config_v2.items():
        config[key] = value.text if value.WhichOneof("value") == "text" else float(value.number)
    fb_input = {"data": data, "loss_fn": msg.loss_fn or "cross_entropy", "loss_fn_config": config or None}
    return ({"model_id": msg.model_id, "seq_id": msg.seq_id, "forward_backward_input": fb_input,
             "forward_only": msg.forward_only}, bool(msg.forward_only))


def forward_backward_output_to_proto(body: dict[str, Any]) -> bytes:
    """The worker's forward/backward JSON result -> a `ForwardBackwardOutput` protobuf (one ArrayRecord)."""
    pb = _pb()
    out = pb.ForwardBackwardOutput(loss_fn_output_type=str(body.get("loss_fn_output_type") or "ArrayRecord"))
    for key, value in (body.get("metrics") or {}).items():
        if isinstance(value, int | float):
            out.metrics[key] = float(value)
    outputs: list[dict[str, Any]] = body.get("loss_fn_outputs") or []
    record = out.loss_fn_outputs.add(num_datums=len(outputs))
    names = list(outputs[0]) if outputs else []
    for name in names:
        arrays = [TensorData.model_validate(o[name]).to_numpy() for o in outputs]
        is_float = all(a.dtype.kind == "f" for a in arrays)
        np_dtype = np.float32 if is_float else np.int64
        arrays = [a.astype(np_dtype) for a in arrays]
        offsets = np.cumsum([0] + [a.nbytes for a in arrays]).astype(np.int64)
        record.fields[name].CopyFrom(pb.BatchedTensor(
            data=b"".join(a.tobytes() for a in arrays), offsets=offsets.tobytes(),
            dtype=pb.DTYPE_FLOAT32 if is_float else pb.DTYPE_INT64,
            trailing_shape=list(arrays[0].shape[1:]) if arrays else []))
    return bytes(out.SerializeToString())


def sample_response_to_proto(sequences: list[dict[str, Any]], prompt_logprobs: list[float | None] | None) -> bytes:
    """Sampled sequences `{tokens, logprobs, stop_reason}` -> a `SampleResponse` protobuf."""
    pb = _pb()
    out = pb.SampleResponse()
    for seq in sequences:
        out.sequences.add(
            stop_reason=pb.STOP_REASON_LENGTH if seq["stop_reason"] == "length" else pb.STOP_REASON_STOP,
            tokens=np.asarray(seq["tokens"], dtype=np.int32).tobytes(),
            logprobs=np.asarray(seq["logprobs"], dtype=np.float32).tobytes())
    if prompt_logprobs is not None:
        values = [np.nan if v is None else v for v in prompt_logprobs]
        out.prompt_logprobs = np.asarray(values, dtype=np.float32).tobytes()
    return bytes(out.SerializeToString())
