"""The one name rule: every user-supplied name is checked before it becomes a path, and paths stay inside."""

from __future__ import annotations

import os

import pydantic
import pytest

from firetitan.errors import InvalidRequestError
from firetitan.names import MAX_NAME_LENGTH, SafeName, check_name, check_within, resolve_under
from firetitan.server.control_plane.home import HomeLayout

GOOD = ["local", "job-1", "trainer-ab12cd34", "step-0001", "a.b_c-D9", "sampler-3-ab12cd34", "x" * MAX_NAME_LENGTH]
BAD = ["", "..", ".", "../../escaped", "..%2F..%2Fescaped", "a/b", "a\\b", ".hidden", "-rf", "_x", "a b",
       "a..b", "é", "a\x00b", "x" * (MAX_NAME_LENGTH + 1), "a\n"]


@pytest.mark.parametrize("name", GOOD)
def test_good_names(name: str) -> None:
    assert check_name(name, "account") == name


@pytest.mark.parametrize("name", BAD)
def test_bad_names_are_refused_naming_the_field(name: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        check_name(name, "account")
    assert info.value.field == "account" and info.value.status_code == 400


def test_non_strings_are_refused() -> None:
    for value in (None, 1, ["a"], b"a"):
        with pytest.raises(InvalidRequestError, match="string"):
            check_name(value, "id")


class Route(pydantic.BaseModel):
    account: SafeName
    job_id: SafeName = "job-1"


def test_pydantic_type_names_the_field() -> None:
    assert Route(account="local").account == "local"
    for bad in ("../../escaped", 7, "a/b"):
        with pytest.raises(pydantic.ValidationError) as info:
            Route.model_validate({"account": bad})
        err = info.value.errors()[0]
        assert err["loc"] == ("account",)
    with pytest.raises(pydantic.ValidationError, match=r"'\.\.'"):
        Route.model_validate({"account": "ok", "job_id": "a..b"})


def test_resolve_under_keeps_paths_inside(tmp_path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    assert resolve_under(root, "a", "b") == (root / "a" / "b").resolve()
    with pytest.raises(InvalidRequestError):
        resolve_under(root, "..", "escaped")
    # a symlink planted inside the root that points out of it is refused too
    (tmp_path / "outside").mkdir()
    os.symlink(tmp_path / "outside", root / "link")
    with pytest.raises(InvalidRequestError, match="outside"):
        resolve_under(root, "link", field="identity")
    assert check_within(root, root / "a") == (root / "a").resolve()
    with pytest.raises(InvalidRequestError) as info:
        check_within(root, tmp_path / "outside")
    assert info.value.field == "path"


def test_home_state_dir_refuses_the_escaping_account(tmp_path) -> None:
    layout = HomeLayout(tmp_path / "home").ensure()
    assert layout.trainer_state_dir("local", "job1") == (tmp_path / "home" / "trainers" / "local" / "job1")
    with pytest.raises(InvalidRequestError) as info:
        layout.trainer_state_dir("../../escaped", "job1")
    assert info.value.field == "account"
    with pytest.raises(InvalidRequestError) as info:
        layout.trainer_state_dir("local", "../job1")
    assert info.value.field == "rlorTrainerJobId"
    assert not (tmp_path / "escaped").exists()
