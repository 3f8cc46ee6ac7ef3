"""The model-alias table in FIRETITAN_HOME: hosted Fireworks model and training-shape names -> local models.

A script written for api.fireworks.ai names `accounts/fireworks/models/qwen3-8b` and
`accounts/fireworks/trainingShapes/qwen3-8b-128k-h200`. firetitan never downloads, so each hosted
name a user wants to run locally is mapped once to a built-in model or a local Hugging Face
directory (`firetitan models alias NAME TARGET`). For a training-shape name the target is a model,
and the control plane then uses that model's local training shape.

The table is one JSON file, `<home>/model_aliases.json`, written atomically (temp file + rename)
under an advisory lock so two CLI calls never lose an edit. It holds at most `MAX_ALIASES` entries.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from firetitan.errors import ConfigError, ModelNotFoundError
from firetitan.models.registry import resolve_model_name as resolve_local_model

__all__ = [
    "ALIASES_FILE",
    "MAX_ALIASES",
    "AliasTable",
    "alias_kind",
    "is_hosted_name",
    "list_aliases",
    "missing_shape_alias_error",
    "remove_alias",
    "resolve_model_name",
    "resolve_shape_model",
    "set_alias",
]

ALIASES_FILE = "model_aliases.json"
MAX_ALIASES = 1000  # a hand-edited table; the bound keeps a runaway script from growing it forever
TABLE_VERSION = 1

# Hosted resource names as Fireworks spells them: account ids are lowercase with '-', resource ids
# also allow '.', '_' (e.g. "llama-v3p1-8b-instruct", "qwen3-8b").
_HOSTED = re.compile(r"^accounts/([a-z0-9][a-z0-9-]{0,62})/(models|trainingShapes)/([A-Za-z0-9][A-Za-z0-9._-]{0,127})$")
_HOSTED_PREFIX = re.compile(r"^accounts/[^/]+/(models|trainingShapes)/")

AliasKind = Literal["model", "trainingShape"]


class AliasTable(BaseModel):
    """What `<home>/model_aliases.json` holds: hosted name -> built-in name or absolute model directory."""

    version: int = TABLE_VERSION
    aliases: dict[str, str] = Field(default_factory=dict, max_length=MAX_ALIASES)


def is_hosted_name(name: str) -> bool:
    """True for anything shaped like a hosted resource name (`accounts/<a>/models|trainingShapes/<id>`)."""
    return isinstance(name, str) and _HOSTED_PREFIX.match(name.strip()) is not None


def alias_kind(name: str, *, field: str = "name") -> AliasKind:
    """"model" or "trainingShape" for a valid hosted name; a `ConfigError` naming the rule otherwise."""
    match = _HOSTED.match(name.strip()) if isinstance(name, str) else None
    if match is None:
        raise ConfigError(
            f"{field} {name!r} is not a hosted model or training-shape name; expected "
            "accounts/<account>/models/<id> or accounts/<account>/trainingShapes/<id> (account: lowercase "
            "letters, digits, '-'; id: letters, digits, '.', '_', '-', at most 128 characters)",
            field=field)
    return "model" if match.group(2) == "models" else "trainingShape"


def _table_path(home: str | os.PathLike[str]) -> Path:
    return Path(home).expanduser() / ALIASES_FILE


def _load(path: Path) -> AliasTable:
    try:
        raw = path.read_text()
    except FileNotFoundError:
        return AliasTable()
    try:
        table = AliasTable.model_validate_json(raw)
    except ValueError as exc:
        raise ConfigError(f"the model-alias table {str(path)!r} is not valid ({exc.__class__.__name__}: "
                          f"{str(exc).splitlines()[0]}); fix or delete it, then re-add aliases with "
                          "`firetitan models alias NAME TARGET`", field="model_aliases") from exc
    if table.version != TABLE_VERSION:
        raise ConfigError(f"the model-alias table {str(path)!r} has version {table.version}; this firetitan "
                          f"reads version {TABLE_VERSION}", field="model_aliases.version")
    return table


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _save(path: Path, table: AliasTable) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(table.model_dump(), indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)  # readers see the old table or the new one, never half of one


def _canonical_target(target: str | os.PathLike[str]) -> str:
    """A built-in name or the absolute path of a local model directory (never another hosted name)."""
    if isinstance(target, str) and is_hosted_name(target):
        raise ConfigError(f"target {target!r} is a hosted name; an alias points at a built-in model "
                          "(e.g. firetitan/nano-qwen3) or a local Hugging Face directory", field="target")
    if isinstance(target, str) and not target.strip():
        raise ConfigError("target is empty; give a built-in model or a local model directory", field="target")
    try:
        return resolve_local_model(target, field="target")
    except ModelNotFoundError as exc:
        raise ConfigError(exc.message, field="target") from exc


def set_alias(home: str | os.PathLike[str], name: str, target: str | os.PathLike[str]) -> str:
    """Map hosted `name` to `target` (replacing any earlier alias); returns the stored target."""
    alias_kind(name)
    key = name.strip()
    value = _canonical_target(target)
    path = _table_path(home)
    with _locked(path):
        table = _load(path)
        if key not in table.aliases and len(table.aliases) >= MAX_ALIASES:
            raise ConfigError(f"the model-alias table {str(path)!r} already holds {MAX_ALIASES} aliases; remove "
                              "some with `firetitan models alias --remove NAME`", field="name")
        table.aliases[key] = value
        _save(path, table)
    return value


def remove_alias(home: str | os.PathLike[str], name: str) -> bool:
    """Drop the alias of `name`; False when there was none."""
    path = _table_path(home)
    with _locked(path):
        table = _load(path)
        if table.aliases.pop(name.strip(), None) is None:
            return False
        _save(path, table)
    return True


def list_aliases(home: str | os.PathLike[str]) -> dict[str, str]:
    """Every alias, sorted by name."""
    return dict(sorted(_load(_table_path(home)).aliases.items()))


def _missing(name: str, home: str | os.PathLike[str], field: str, example: str) -> ModelNotFoundError:
    return ModelNotFoundError(
        f"{field} {name!r} is a hosted Fireworks name with no local alias in the model-alias table "
        f"{str(_table_path(home))!r}; map it once with `firetitan models alias {name} {example}` "
        "(a built-in model or a local Hugging Face directory), then retry. `firetitan models list` shows the table.",
        field=field)


def resolve_model_name(name: str | os.PathLike[str] | None, home: str | os.PathLike[str], *,
                       field: str = "base_model") -> str:
    """The local model a base-model name means: hosted names through the alias table, others as before.

    A hosted model name (`accounts/<a>/models/<id>`) must have an alias, else `ModelNotFoundError`
    naming the table and the command. Anything else goes to `firetitan.models.resolve_model_name`
    (built-in name or local directory), so existing callers keep their behaviour.
    """
    if isinstance(name, str) and is_hosted_name(name):
        if alias_kind(name, field=field) != "model":
            raise ConfigError(f"{field} {name!r} is a training-shape name, not a model name", field=field)
        target = list_aliases(home).get(name.strip())
        if target is None:
            raise _missing(name, home, field, "firetitan/tiny-qwen3")
        return target
    return resolve_local_model(name, field=field)


def resolve_shape_model(name: str, home: str | os.PathLike[str], *, field: str = "trainingShape") -> str | None:
    """For an aliased training-shape name (any `/versions/<v>` suffix ignored), the model whose local
    shape to use; None when the name has no alias, so the shape registry answers as before.

    The control plane then raises `missing_shape_alias_error` when the registry does not know the
    shape either and the name is a hosted one (not `accounts/local/...`).
    """
    if not isinstance(name, str) or not is_hosted_name(name):
        return None
    base = name.strip().split("/versions/")[0]
    if alias_kind(base, field=field) != "trainingShape":
        return None
    return list_aliases(home).get(base)


def missing_shape_alias_error(name: str, home: str | os.PathLike[str], *,
                              field: str = "trainingShape") -> ModelNotFoundError:
    """The error for a hosted training-shape name with no alias (names the table and the command)."""
    return _missing(name, home, field, "firetitan/tiny-qwen3")
