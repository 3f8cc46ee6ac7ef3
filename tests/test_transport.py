"""The transport's retry policy: backoff shape, Retry-After in both forms, and the retryable set."""

from __future__ import annotations

import email.utils
import random

import pytest

from firetitan.errors import ConfigError
from firetitan.transport import RETRYABLE_STATUSES, RetryPolicy, parse_retry_after


def test_parse_retry_after_seconds_and_http_date() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after("-4") == 0.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    now = 1_800_000_000.0
    date = email.utils.formatdate(now + 12, usegmt=True)
    assert parse_retry_after(date, now=now) == pytest.approx(12.0, abs=1.0)
    assert parse_retry_after(email.utils.formatdate(now - 60, usegmt=True), now=now) == 0.0


def test_backoff_grows_caps_and_keeps_retry_after_as_floor() -> None:
    policy = RetryPolicy(backoff_base=1.0, backoff_max=5.0)
    rng = random.Random(0)
    for attempt, nominal in ((1, 1.0), (2, 2.0), (3, 4.0), (6, 5.0)):
        d = policy.delay(attempt, rng=rng)
        assert 0.5 * nominal <= d < 1.5 * nominal
    assert policy.delay(1, retry_after=9.0, rng=rng) >= 9.0
    assert policy.delay(1, retry_after=10_000.0, rng=rng) == policy.retry_after_max


def test_retryable_set_and_validation() -> None:
    assert {429, 502, 503, 504} <= RETRYABLE_STATUSES
    assert not {400, 401, 404, 409, 422} & RETRYABLE_STATUSES
    assert RetryPolicy().once().max_attempts == 1
    with pytest.raises(ConfigError):
        RetryPolicy(max_attempts=0)
