"""Validation of user-chosen checkpoint names and construction of public snapshot identities."""

from __future__ import annotations

import re
import secrets

from firetitan.errors import InvalidRequestError

MAX_NAME_LENGTH = 128
_NAME_RE = re.compile(r"[A-Za-z0-9._-]+")
_SUFFIX_RE = re.compile(r"[A-Za-z0-9]+")


def validate_name(name: object, field: str = "name") -> str:
    """Return `name` if it is a safe single path component, else raise `InvalidRequestError(field)`.

    Names become directory names inside a store shared with other processes, so anything that could
    escape the directory or hide in it (`/`, `..`, a leading `.`) is refused rather than sanitised.
    """
    if not isinstance(name, str):
        raise InvalidRequestError(f"{field} must be a string, got {type(name).__name__}", field=field)
    if not name:
        raise InvalidRequestError(f"{field} must not be empty", field=field)
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidRequestError(
            f"{field} is {len(name)} characters long; at most {MAX_NAME_LENGTH} are allowed", field=field
        )
    if "/" in name or "\\" in name:
        raise InvalidRequestError(f"{field} {name!r} must not contain '/' or '\\'", field=field)
    if ".." in name:
        raise InvalidRequestError(f"{field} {name!r} must not contain '..'", field=field)
    if name.startswith("."):
        raise InvalidRequestError(f"{field} {name!r} must not start with '.'", field=field)
    if not _NAME_RE.fullmatch(name):
        raise InvalidRequestError(
            f"{field} {name!r} may contain only letters, digits, '.', '_' and '-'", field=field
        )
    return name


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
