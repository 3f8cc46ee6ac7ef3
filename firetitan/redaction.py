"""Keep secrets out of output: redact API keys in environment dumps, log events and error text."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

# Names whose values are secrets (environment variables, log fields, headers).
_SECRET_NAME = re.compile(r"(api[_-]?key|token|secret|passw(or)?d|authorization|credential)", re.IGNORECASE)
# Env vars whose values are keys even when they appear inside other text (a URL, a command line).
KEY_ENVS = ("FIRETITAN_API_KEY", "FIRETITAN_WORKER_API_KEY", "FIREWORKS_API_KEY", "TINKER_API_KEY")
_BEARER = re.compile(r"(Bearer\s+)[^\s\"',;]+", re.IGNORECASE)
_MIN_SECRET_LEN = 8  # shorter "keys" would redact ordinary words


def is_secret_name(name: str) -> bool:
    return bool(_SECRET_NAME.search(name))


def mask(value: object) -> str:
    """What is shown instead of a secret: that one is set, and its length, never any of its characters."""
    return f"<redacted, {len(str(value))} chars>" if value else "<empty>"


def redact_env(env: Mapping[str, str]) -> dict[str, str]:
    """`env` with every secret-named variable masked (for `firetitan doctor` and similar dumps)."""
    return {k: mask(v) if is_secret_name(k) else redact_text(v) for k, v in env.items()}


def known_secrets() -> list[str]:
    return [v for k in KEY_ENVS if len(v := os.environ.get(k, "")) >= _MIN_SECRET_LEN]


def redact_text(text: str, secrets: list[str] | None = None) -> str:
    """`text` with bearer tokens and the given (default: this process's known) keys masked."""
    text = _BEARER.sub(lambda m: m.group(1) + "<redacted>", text)
    for secret in known_secrets() if secrets is None else secrets:
        if len(secret) >= _MIN_SECRET_LEN and secret in text:
            text = text.replace(secret, "<redacted>")
    return text


def redact_event(_logger: Any, _method: str, event: dict[str, Any]) -> dict[str, Any]:
    """structlog processor: secret-named fields masked, keys and bearer tokens masked inside strings."""
    secrets = known_secrets()
    for key, value in list(event.items()):
        if is_secret_name(key) and value is not None:
            event[key] = mask(value)
        elif isinstance(value, str):
            event[key] = redact_text(value, secrets)
    return event
