"""Name and identity validation for snapshots and train states: traversal, separators, length."""

from __future__ import annotations

import pytest

from firetitan.checkpoints import (
    MAX_NAME_LENGTH,
    SnapshotStore,
    TrainStateStore,
    make_identity,
    new_client_suffix,
    validate_name,
)
from firetitan.errors import InvalidRequestError, NotFoundError

BAD_NAMES = ["../x", "a/b", "", "..", "a..b", ".hidden", "a b", "a\\b", "x" * (MAX_NAME_LENGTH + 1), "é"]


@pytest.mark.parametrize("name", ["step-0001", "a.b_c-D9", "x" * MAX_NAME_LENGTH])
def test_valid_names_pass(name: str) -> None:
    assert validate_name(name) == name


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_names_raise_naming_the_field(name: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        validate_name(name)
    assert info.value.field == "name"
    assert info.value.status_code == 400


def test_non_string_name() -> None:
    with pytest.raises(InvalidRequestError, match="string"):
        validate_name(None)  # type: ignore[arg-type]


def test_make_identity_appends_client_suffix() -> None:
    suffix = new_client_suffix()
    assert len(suffix) == 8 and suffix != new_client_suffix()
    assert make_identity("step-1", "a1b2c3d4") == "step-1-a1b2c3d4"
    with pytest.raises(InvalidRequestError) as info:
        make_identity("step-1", "../x")
    assert info.value.field == "client_suffix"
    with pytest.raises(InvalidRequestError) as info:
        make_identity("a/b", "a1b2c3d4")
    assert info.value.field == "name"
    with pytest.raises(InvalidRequestError, match="at most"):
        make_identity("x" * MAX_NAME_LENGTH, "a1b2c3d4")


@pytest.mark.parametrize("name", ["../x", "a/b", ""])
def test_store_refuses_bad_names_and_writes_nothing(tmp_path, nano, name: str) -> None:
    store = SnapshotStore(tmp_path / "store")
    with pytest.raises(InvalidRequestError) as info:
        store.save_base(name, nano.state_dict(), nano.config)
    assert info.value.field == "name"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]
    assert list((tmp_path / "store" / "snapshots").iterdir()) == []


def test_store_lookups_validate_identity(tmp_path) -> None:
    store = SnapshotStore(tmp_path)
    with pytest.raises(InvalidRequestError) as info:
        store.manifest("../etc")
    assert info.value.field == "identity"
    with pytest.raises(NotFoundError):
        store.manifest("never-saved")
    with pytest.raises(NotFoundError):
        store.load_state_dict("never-saved")


def test_train_state_store_names(tmp_path) -> None:
    store = TrainStateStore(tmp_path)
    with pytest.raises(InvalidRequestError) as info:
        store.path("a/b")
    assert info.value.field == "name"
    with pytest.raises(InvalidRequestError) as info:
        store.resolve("../x")
    assert info.value.field == "path"
    with pytest.raises(InvalidRequestError) as info:
        store.resolve("tinker://run/sampler_weights/step-1")
    assert info.value.field == "path"
    with pytest.raises(NotFoundError):
        store.resolve("step-100")
