"""The error hierarchy maps to HTTP statuses and back without losing the type or the field."""

import pytest

from firetitan import errors


@pytest.mark.parametrize(
    "exc",
    [
        errors.InvalidRequestError("bad tokens", field="prompt"),
        errors.NotFoundError("no such job"),
        errors.ConflictError("delta base mismatch"),
        errors.SnapshotError("checksum mismatch", field="identity"),
        errors.AuthenticationError("no key"),
        errors.ModelNotFoundError("unknown model", field="base_model"),
    ],
)
def test_round_trip_through_body(exc: errors.FiretitanError) -> None:
    rebuilt = errors.from_response(exc.status_code, exc.to_body())
    assert type(rebuilt) is type(exc)
    assert rebuilt.message == exc.message
    assert rebuilt.field == exc.field
    assert rebuilt.status_code == exc.status_code


def test_unknown_body_falls_back_on_status() -> None:
    assert isinstance(errors.from_response(400, {"detail": "x"}), errors.InvalidRequestError)
    assert isinstance(errors.from_response(418, "teapot"), errors.APIStatusError)
    assert errors.from_response(418, "teapot").message == "teapot"


def test_python_bases_let_callers_catch_builtin_kinds() -> None:
    assert issubclass(errors.InvalidRequestError, ValueError)
    assert issubclass(errors.APITimeoutError, TimeoutError)
    assert issubclass(errors.NotFoundError, LookupError)


@pytest.mark.parametrize("exc", [
    errors.PayloadTooLargeError("body over 4096 bytes", field="body"),
    errors.UnsupportedMediaTypeError("send JSON", field="Content-Type"),
    errors.MethodNotAllowedError("GET /x"),
])
def test_request_bound_errors_round_trip_and_stay_invalid_requests(exc: errors.FiretitanError) -> None:
    rebuilt = errors.from_response(exc.status_code, exc.to_body())
    assert type(rebuilt) is type(exc) and rebuilt.field == exc.field
    assert isinstance(rebuilt, errors.InvalidRequestError) and 400 <= rebuilt.status_code < 500


def test_internal_error_carries_its_id_and_nothing_else() -> None:
    exc = errors.InternalServerError("internal error abc123", error_id="abc123")
    body = exc.to_body()
    assert body["error"]["error_id"] == "abc123" and body["error"]["type"] == "InternalServerError"
    rebuilt = errors.from_response(500, body)
    assert isinstance(rebuilt, errors.InternalServerError) and rebuilt.error_id == "abc123"
