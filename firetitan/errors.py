"""One exception hierarchy for the SDK and the services, with HTTP status mapping both ways."""

from __future__ import annotations

from typing import Any


class FiretitanError(Exception):
    """Base class of every error firetitan raises on purpose."""

    status_code: int = 500

    def __init__(self, message: str, *, field: str | None = None, status_code: int | None = None,
                 body: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.body = body
        if status_code is not None:
            self.status_code = status_code

    def to_body(self) -> dict[str, Any]:
        """The JSON error body every firetitan service returns."""
        return {"error": {"type": type(self).__name__, "message": self.message, "field": self.field}}


class ConfigError(FiretitanError, ValueError):
    """A configuration value is invalid; raised before anything is started."""

    status_code = 400


class InvalidRequestError(FiretitanError, ValueError):
    """A request was malformed; `field` names the offending field."""

    status_code = 400


class PayloadTooLargeError(InvalidRequestError):
    """The request body is larger than the API's limit (the message states it)."""

    status_code = 413


class UnsupportedMediaTypeError(InvalidRequestError):
    """The request body is declared as something other than JSON."""

    status_code = 415


class MethodNotAllowedError(InvalidRequestError):
    """The route exists but not with this HTTP method."""

    status_code = 405


class InternalServerError(FiretitanError):
    """A service failed on a bug; `error_id` finds the traceback in that service's log."""

    status_code = 500

    def __init__(self, message: str, *, error_id: str | None = None, **kw: Any) -> None:
        super().__init__(message, **kw)
        if error_id is None and isinstance(self.body, dict) and isinstance(self.body.get("error"), dict):
            error_id = self.body["error"].get("error_id")
        self.error_id = error_id

    def to_body(self) -> dict[str, Any]:
        body = super().to_body()
        body["error"]["error_id"] = self.error_id
        return body


class NonFiniteError(InvalidRequestError):
    """A loss, gradient or optimizer update came out NaN/inf; the step was refused, nothing changed."""


class AuthenticationError(FiretitanError):
    """Missing or wrong API key."""

    status_code = 401


class NotFoundError(FiretitanError, LookupError):
    """The named resource does not exist."""

    status_code = 404


class ConflictError(FiretitanError):
    """The request conflicts with the resource's current state."""

    status_code = 409


class ModelNotFoundError(NotFoundError):
    """A base model name or directory could not be resolved locally."""


class SnapshotError(ConflictError):
    """A snapshot is corrupt, or a delta does not apply to the loaded base."""


class APIStatusError(FiretitanError):
    """Any other HTTP error status from a firetitan service."""


class APITimeoutError(FiretitanError, TimeoutError):
    """A remote call did not finish within its timeout."""

    status_code = 504


class APIConnectionError(FiretitanError, ConnectionError):
    """The service could not be reached."""

    status_code = 503


class WorkerCrashedError(FiretitanError):
    """A worker process exited unexpectedly."""

    status_code = 503


class StalenessError(FiretitanError):
    """A sample is older than the configured off-policy bound."""

    status_code = 409


class SamplingRequestError(FiretitanError):
    """A sampling request failed after exhausting its retries."""

    def __init__(self, message: str, *, attempts: int = 0, final_status: int | None = None,
                 final_error_kind: str | None = None, request_id: str | None = None,
                 retry_budget_exhausted: bool = False, **kw: Any) -> None:
        super().__init__(message, status_code=final_status or 502, **kw)
        self.attempts = attempts
        self.final_status = final_status
        self.final_error_kind = final_error_kind
        self.request_id = request_id
        self.retry_budget_exhausted = retry_budget_exhausted

    def as_error_record(self) -> dict[str, Any]:
        return {"message": self.message, "attempts": self.attempts, "final_status": self.final_status,
                "final_error_kind": self.final_error_kind, "request_id": self.request_id,
                "retry_budget_exhausted": self.retry_budget_exhausted}


class DeploymentSamplerTimeoutError(SamplingRequestError, TimeoutError):
    """A sampling request timed out on every attempt."""


_BY_NAME: dict[str, type[FiretitanError]] = {
    cls.__name__: cls
    for cls in (ConfigError, InvalidRequestError, NonFiniteError, AuthenticationError, NotFoundError, ConflictError,
                ModelNotFoundError, SnapshotError, APIStatusError, APITimeoutError, APIConnectionError,
                WorkerCrashedError, StalenessError, PayloadTooLargeError, UnsupportedMediaTypeError,
                MethodNotAllowedError, InternalServerError)
}
_BY_STATUS: dict[int, type[FiretitanError]] = {
    400: InvalidRequestError, 401: AuthenticationError, 403: AuthenticationError, 404: NotFoundError,
    405: MethodNotAllowedError, 409: ConflictError, 413: PayloadTooLargeError, 415: UnsupportedMediaTypeError,
    422: InvalidRequestError, 500: InternalServerError, 504: APITimeoutError,
}


def from_response(status: int, body: Any) -> FiretitanError:
    """Rebuild the typed error a service sent (by its `type`, else by HTTP status)."""
    message, field, type_name = f"HTTP {status}", None, None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        err = body["error"]
        message = str(err.get("message") or message)
        field = err.get("field")
        type_name = err.get("type")
    elif isinstance(body, dict) and isinstance(body.get("error"), str):
        message = body["error"]
    elif isinstance(body, str) and body:
        message = body[:2000]
    cls = _BY_NAME.get(type_name or "") or _BY_STATUS.get(status) or APIStatusError
    return cls(message, field=field, status_code=status, body=body)
