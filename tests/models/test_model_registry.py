"""Name resolution: built-in names, aliases, local directories and the error for anything else."""

from __future__ import annotations

from pathlib import Path

import pytest

from firetitan.errors import ModelNotFoundError, NotFoundError
from firetitan.models import (
    BUILTIN_MODELS,
    DEFAULT_MODEL,
    is_builtin,
    load_model,
    load_tokenizer,
    model_config,
    resolve_model_name,
)


def test_builtins_are_registered_with_the_default_first() -> None:
    assert list(BUILTIN_MODELS) == ["firetitan/tiny-qwen3", "firetitan/nano-qwen3"]
    assert DEFAULT_MODEL == "firetitan/tiny-qwen3"


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("firetitan/tiny-qwen3", "firetitan/tiny-qwen3"),
        ("firetitan/nano-qwen3", "firetitan/nano-qwen3"),
        ("  Firetitan/Tiny-Qwen3 ", "firetitan/tiny-qwen3"),
        (None, "firetitan/tiny-qwen3"),
        ("", "firetitan/tiny-qwen3"),
    ],
)
def test_resolve_builtin_names(given: str | None, expected: str) -> None:
    assert resolve_model_name(given) == expected


def test_is_builtin() -> None:
    assert is_builtin("firetitan/nano-qwen3")
    assert is_builtin("FIRETITAN/tiny-qwen3")
    assert not is_builtin("tiny-qwen3")  # a bare name is a relative path, not an alias
    assert not is_builtin("Qwen/Qwen3-0.6B")
    assert not is_builtin(None)
    assert not is_builtin(Path("firetitan/nano-qwen3"))


def test_local_directory_resolves_to_absolute_path(nano_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(nano_dir.parent)
    assert resolve_model_name(nano_dir.name) == str(nano_dir.resolve())
    assert resolve_model_name(nano_dir) == str(nano_dir.resolve())


@pytest.mark.parametrize("loader", [resolve_model_name, model_config, load_model, load_tokenizer])
def test_unknown_name_fails_at_once_listing_builtins(loader) -> None:
    with pytest.raises(ModelNotFoundError) as info:
        loader("Qwen/Qwen3-0.6B")
    message = str(info.value)
    assert "Qwen/Qwen3-0.6B" in message
    for name in BUILTIN_MODELS:
        assert name in message
    assert isinstance(info.value, NotFoundError)
    assert info.value.status_code == 404


def test_tokenizer_errors_name_the_tokenizer_field() -> None:
    with pytest.raises(ModelNotFoundError) as info:
        load_tokenizer("no/such-tokenizer")
    assert info.value.field == "tokenizer_model"


def test_directory_without_config_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match=r"config\.json"):
        load_model(tmp_path)


def test_directory_without_weights_is_rejected(nano_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "config.json").write_bytes((nano_dir / "config.json").read_bytes())
    assert model_config(tmp_path).hidden_size == 64  # the config alone is readable
    with pytest.raises(ModelNotFoundError, match="cannot load model directory"):
        load_model(tmp_path)
    with pytest.raises(ModelNotFoundError, match="tokenizer"):
        load_tokenizer(tmp_path)
