"""The one HTTP core: loop-local sessions, one retry policy, JSON requests with typed errors.

Neutral ground: the SDK (`firetitan.client`) and the services (`firetitan.server`) both build on it,
so it imports neither.
"""

from firetitan.transport.json_request import request_json
from firetitan.transport.retry import (
    RETRYABLE_STATUSES,
    RetryPolicy,
    parse_retry_after,
)
from firetitan.transport.sessions import LoopSessions, bearer

__all__ = ["RETRYABLE_STATUSES", "LoopSessions", "RetryPolicy", "bearer", "parse_retry_after", "request_json"]
