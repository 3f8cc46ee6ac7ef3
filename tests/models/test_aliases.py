"""The model-alias table: validated hosted names, canonical targets, resolution, and the CLI."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from firetitan.cli import main as cli_main
from firetitan.errors import ConfigError, ModelNotFoundError
from firetitan.models.aliases import (
    ALIASES_FILE,
    alias_kind,
    list_aliases,
    missing_shape_alias_error,
    remove_alias,
    resolve_model_name,
    resolve_shape_model,
    set_alias,
)

QWEN = "accounts/fireworks/models/qwen3-8b"
SHAPE = "accounts/fireworks/trainingShapes/qwen3-8b-128k-h200"


def test_hosted_model_name_resolves_through_its_alias(tmp_path: Path) -> None:
    assert set_alias(tmp_path, QWEN, "firetitan/nano-qwen3") == "firetitan/nano-qwen3"
    assert resolve_model_name(QWEN, tmp_path) == "firetitan/nano-qwen3"
    # A later alias replaces the earlier one; the file is plain JSON a user can read.
    set_alias(tmp_path, QWEN, "FireTitan/Tiny-Qwen3 ")
    assert resolve_model_name(QWEN, tmp_path) == "firetitan/tiny-qwen3"
    stored = json.loads((tmp_path / ALIASES_FILE).read_text())
    assert stored == {"version": 1, "aliases": {QWEN: "firetitan/tiny-qwen3"}}


def test_local_directory_target_is_stored_absolute(tmp_path: Path, nano_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(nano_dir.parent)
    stored = set_alias(tmp_path / "home", QWEN, nano_dir.name)  # relative to the working directory
    assert stored == str(nano_dir.resolve())
    monkeypatch.chdir(tmp_path)  # resolution no longer depends on where the caller runs
    assert resolve_model_name(QWEN, tmp_path / "home") == str(nano_dir.resolve())


def test_unaliased_hosted_name_names_the_table_and_the_command(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError) as err:
        resolve_model_name(QWEN, tmp_path, field="trainingConfig.baseModel")
    msg = err.value.message
    assert err.value.field == "trainingConfig.baseModel"
    assert str(tmp_path / ALIASES_FILE) in msg and f"firetitan models alias {QWEN}" in msg
    shape_err = missing_shape_alias_error(SHAPE, tmp_path)
    assert shape_err.field == "trainingShape" and f"firetitan models alias {SHAPE}" in shape_err.message


def test_non_hosted_names_keep_the_registry_behaviour(tmp_path: Path, nano_dir: Path) -> None:
    assert resolve_model_name("firetitan/nano-qwen3", tmp_path) == "firetitan/nano-qwen3"
    assert resolve_model_name(None, tmp_path) == "firetitan/tiny-qwen3"
    assert resolve_model_name(str(nano_dir), tmp_path) == str(nano_dir.resolve())
    with pytest.raises(ModelNotFoundError):
        resolve_model_name("no/such-model", tmp_path)


def test_shape_alias_gives_the_model_whose_shape_to_use(tmp_path: Path) -> None:
    assert resolve_shape_model(SHAPE, tmp_path) is None  # no alias yet: the registry decides
    set_alias(tmp_path, SHAPE, "firetitan/nano-qwen3")
    assert resolve_shape_model(SHAPE, tmp_path) == "firetitan/nano-qwen3"
    assert resolve_shape_model(f"{SHAPE}/versions/7", tmp_path) == "firetitan/nano-qwen3"
    assert resolve_shape_model("accounts/local/trainingShapes/nano-qwen3-cpu", tmp_path) is None
    assert resolve_shape_model("nano-qwen3-cpu", tmp_path) is None
    with pytest.raises(ConfigError):  # a shape name is not a base model
        resolve_model_name(SHAPE, tmp_path)


@pytest.mark.parametrize("name", [
    "qwen3-8b", "accounts/fireworks/qwen3-8b", "accounts/Fire Works/models/x", "accounts/fireworks/models/",
    "accounts/fireworks/models/../../etc", "accounts/fireworks/models/a/b", "accounts/fireworks/datasets/x",
    "accounts/fireworks/models/" + "x" * 129,
])
def test_invalid_names_are_refused_naming_the_rule(tmp_path: Path, name: str) -> None:
    with pytest.raises(ConfigError) as err:
        set_alias(tmp_path, name, "firetitan/nano-qwen3")
    assert err.value.field == "name" and "accounts/<account>/models/<id>" in err.value.message
    assert not (tmp_path / ALIASES_FILE).exists()


@pytest.mark.parametrize("target", ["", "nope/not-a-model", "accounts/fireworks/models/qwen3-8b"])
def test_invalid_targets_are_refused(tmp_path: Path, target: str) -> None:
    with pytest.raises(ConfigError) as err:
        set_alias(tmp_path, QWEN, target)
    assert err.value.field == "target"
    assert list_aliases(tmp_path) == {}


def test_alias_kind() -> None:
    assert alias_kind(QWEN) == "model" and alias_kind(SHAPE) == "trainingShape"


def test_remove_and_corrupt_table(tmp_path: Path) -> None:
    set_alias(tmp_path, QWEN, "firetitan/nano-qwen3")
    assert remove_alias(tmp_path, QWEN) is True and remove_alias(tmp_path, QWEN) is False
    (tmp_path / ALIASES_FILE).write_text("{not json")
    with pytest.raises(ConfigError) as err:
        list_aliases(tmp_path)
    assert err.value.field == "model_aliases" and str(tmp_path / ALIASES_FILE) in err.value.message


def test_concurrent_edits_are_not_lost(tmp_path: Path) -> None:
    names = [f"accounts/fireworks/models/m{i}" for i in range(16)]
    threads = [threading.Thread(target=set_alias, args=(tmp_path, n, "firetitan/nano-qwen3")) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(list_aliases(tmp_path)) == sorted(names)


def test_cli_alias_and_list(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    home = str(tmp_path / "home")
    assert cli_main(["models", "--home", home, "alias", QWEN, "firetitan/nano-qwen3"]) == 0
    assert cli_main(["models", "--home", home, "alias", SHAPE, "firetitan/nano-qwen3"]) == 0
    assert cli_main(["models", "--home", home, "alias", "qwen3-8b", "firetitan/nano-qwen3"]) == 2
    capsys.readouterr()
    assert cli_main(["models", "--home", home, "list", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["aliases"] == {QWEN: "firetitan/nano-qwen3", SHAPE: "firetitan/nano-qwen3"}
    assert "firetitan/nano-qwen3" in out["builtin"]
    assert cli_main(["models", "--home", home, "alias", "--remove", QWEN]) == 0
    assert list_aliases(home) == {SHAPE: "firetitan/nano-qwen3"}
