"""One rule for every user-supplied name (accounts, ids, snapshots, states) and paths confined to a root."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, BeforeValidator

from firetitan.errors import InvalidRequestError

# A name is one path component and one query parameter: letters, digits, '.', '_' and '-', starting
# with a letter or digit (so never '.', '..', a hidden file or something that reads as a CLI flag),
# at most MAX_NAME_LENGTH characters, and no '..' anywhere. Fireworks resource ids (lowercase, digits
# and '-', 1-63 characters) and the snapshot names the SDKs make ("step-10", "sampler-3-ab12cd34")
# all pass; nothing that could leave a directory or smuggle a separator does.
MAX_NAME_LENGTH = 128
NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_NAME_RE = re.compile(NAME_PATTERN)
NAME_RULE = (f"1-{MAX_NAME_LENGTH} letters, digits, '.', '_' or '-', starting with a letter or digit "
             "and without '..'")


def check_name(value: object, field: str = "name") -> str:
    """Return `value` if it obeys the name rule, else raise `InvalidRequestError` naming `field`.

    Refused, not sanitised: a name silently changed would address a different resource.
    """
    if not isinstance(value, str):
        raise InvalidRequestError(f"{field} must be a string, got {type(value).__name__}", field=field)
    if not value:
        raise InvalidRequestError(f"{field} must not be empty", field=field)
    if len(value) > MAX_NAME_LENGTH:
        raise InvalidRequestError(
            f"{field} is {len(value)} characters long; at most {MAX_NAME_LENGTH} are allowed", field=field)
    shown = value if len(value) <= 80 else value[:80] + "..."
    if "/" in value or "\\" in value:
        raise InvalidRequestError(f"{field} {shown!r} must not contain '/' or '\\'", field=field)
    if ".." in value:
        raise InvalidRequestError(f"{field} {shown!r} must not contain '..'", field=field)
    if value.startswith("."):
        raise InvalidRequestError(f"{field} {shown!r} must not start with '.'", field=field)
    if not _NAME_RE.fullmatch(value):
        raise InvalidRequestError(f"{field} {shown!r} is not a valid name: use {NAME_RULE}", field=field)
    return value


def resolve_under(root: str | os.PathLike[str], *parts: str, field: str = "name") -> Path:
    """`root/part/...` with every part checked by the name rule and the result proved to lie in `root`.

    The containment check runs on resolved paths, so a symlink planted inside the root that points
    out of it is refused too.
    """
    base = Path(root).resolve()
    for part in parts:
        check_name(part, field=field)
    path = base.joinpath(*parts).resolve()
    if path != base and not path.is_relative_to(base):
        raise InvalidRequestError(f"{field} {'/'.join(parts)!r} resolves outside {base}", field=field)
    return path


def check_within(root: str | os.PathLike[str], path: str | os.PathLike[str], field: str = "path") -> Path:
    """`path` resolved, if it lies inside `root` (resolved); else `InvalidRequestError` naming `field`."""
    base = Path(root).resolve()
    resolved = Path(path).resolve()
    if resolved != base and not resolved.is_relative_to(base):
        raise InvalidRequestError(f"{field} {str(path)!r} is outside {base}; only paths inside it are accepted",
                                  field=field)
    return resolved


def _strict_str(value: object) -> object:
    # Strings only: pydantic would otherwise coerce nothing here, but say so in our own words.
    if not isinstance(value, str):
        raise ValueError(f"must be a string, got {type(value).__name__}")
    return value


def _pydantic_check(value: str) -> str:
    try:
        return check_name(value, field="value")
    except InvalidRequestError as exc:
        # pydantic reports the field's location itself; the message says what would be valid.
        raise ValueError(exc.message.removeprefix("value ")) from None


# For route and body models: `job_id: SafeName`. A violation is a pydantic error (-> 400 naming the field).
SafeName = Annotated[str, BeforeValidator(_strict_str), AfterValidator(_pydantic_check)]
