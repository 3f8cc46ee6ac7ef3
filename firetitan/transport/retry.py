"""`RetryPolicy`: which failures are worth another attempt and how long to wait before it."""

from __future__ import annotations

import dataclasses
import email.utils
import random
import time

# 408/504: the request or a proxy timed out; 429: the server is full and says when to come back;
# 500: a replica failing mid-request (the gateway and the engine answer 500 for a broken stream);
# 502/503: the worker is restarting or gone. Anything else is the caller's problem and fails at once.
RETRYABLE_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a `Retry-After` header: delta-seconds or an HTTP date (RFC 9110 10.2.3)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """Up to `max_attempts` attempts; before attempt k+1 (k >= 1) sleep
    `min(backoff_max, backoff_base * 2**(k-1)) * U[0.5, 1.5)`, never less than the server's
    `Retry-After` (capped at `retry_after_max` so a hostile header cannot park a client for hours).
    """

    max_attempts: int = 4
    backoff_base: float = 0.25
    backoff_max: float = 30.0
    retry_after_max: float = 300.0
    statuses: frozenset[int] = RETRYABLE_STATUSES

    def __post_init__(self) -> None:
        from firetitan.errors import ConfigError

        if self.max_attempts < 1:
            raise ConfigError(f"max_attempts must be >= 1, got {self.max_attempts}", field="max_attempts")
        if self.backoff_base < 0 or self.backoff_max < 0:
            raise ConfigError(f"backoff_base and backoff_max must be >= 0, got {self.backoff_base}, "
                              f"{self.backoff_max}", field="backoff_base")

    def retryable(self, status: int) -> bool:
        return status in self.statuses

    def delay(self, attempt: int, retry_after: float | None = None, rng: random.Random | None = None) -> float:
        """Seconds to sleep before retry number `attempt` (1-based)."""
        r = (rng or random).random()
        delay = min(self.backoff_max, self.backoff_base * (2 ** max(0, attempt - 1))) * (0.5 + r)
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.retry_after_max))
        return delay

    def once(self) -> RetryPolicy:
        """The same policy with a single attempt (for calls that must not be repeated)."""
        return dataclasses.replace(self, max_attempts=1)
