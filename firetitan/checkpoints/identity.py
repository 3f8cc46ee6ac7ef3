"""Validation of user-chosen checkpoint names and construction of public snapshot identities."""

from __future__ import annotations

import re
import secrets

from firetitan.errors import InvalidRequestError
from firetitan.names import MAX_NAME_LENGTH, check_name

__all__ = ["MAX_NAME_LENGTH", "make_identity", "new_client_suffix", "validate_name"]

_SUFFIX_RE = re.compile(r"[A-Za-z0-9]+")


def validate_name(name: object, field: str = "name") -> str:
    """Return `name` if it is a safe single path component (the one rule in `firetitan.names`).

    Names become directory names inside a store shared with other processes, so anything that could
    escape the directory or hide in it (`/`, `..`, a leading `.`) is refused rather than sanitised.
    """
    return check_name(name, field=field)


def new_client_suffix() -> str:
    """A fresh 8-hex per-client suffix, so two clients saving `step-1` never collide."""
    return secrets.token_hex(4)


def make_identity(name: str, client_suffix: str, field: str = "name") -> str:
    """The public snapshot identity `"<name>-<client_suffix>"`, validated as a whole."""
    validate_name(name, field=field)
    if not isinstance(client_suffix, str) or not _SUFFIX_RE.fullmatch(client_suffix):
        raise InvalidRequestError(
            f"client_suffix {client_suffix!r} must be non-empty letters and digits", field="client_suffix"
        )
    return validate_name(f"{name}-{client_suffix}", field=field)
