"""Fuzz the control plane's HTTP API: hostile names in paths and malformed bodies are 4xx, never 500."""

from __future__ import annotations

import json
from urllib.parse import quote

import fuzz_http as fz
from fuzz_http import Target, assert_alive, assert_answer_names_the_problem, body_with, call, fields_of
from hypothesis import given
from hypothesis import strategies as st

A = "/v1/accounts/{account}"
# (method, path, body template or None). Bodies on create routes get hostile values only: a valid
# random body would start a real trainer or replica per example.
ROUTES: list[tuple[str, str, dict | None]] = [
    ("GET", A + "/rlorTrainerJobs", None),
    ("POST", A + "/rlorTrainerJobs", {"trainingConfig": {"baseModel": "firetitan/nano-qwen3", "loraRank": 4,
                                                          "learningRate": 1e-4}, "displayName": "fz"}),
    ("GET", A + "/rlorTrainerJobs/{rid}", None),
    ("DELETE", A + "/rlorTrainerJobs/{rid}", None),
    ("POST", A + "/rlorTrainerJobs/{rid}:resume", None),
    ("GET", A + "/rlorTrainerJobs/{rid}/checkpoints", None),
    ("GET", A + "/deployments", None),
    ("POST", A + "/deployments", {"baseModel": "firetitan/nano-qwen3", "minReplicaCount": 1}),
    ("GET", A + "/deployments/{rid}", None),
    ("PATCH", A + "/deployments/{rid}", {"minReplicaCount": 1, "displayName": "x"}),
    ("DELETE", A + "/deployments/{rid}", None),
    ("POST", A + "/deployments/{rid}/hot_load/v1/models/hot_load", {"identity": "nope", "mode": "SYNC"}),
    ("GET", A + "/deployments/{rid}/hot_load/v1/models/hot_load", None),
    ("POST", A + "/deployments/{rid}/v1/completions", {"prompt": [1, 2], "max_tokens": 1}),
    ("GET", A + "/checkpoints", None),
    ("GET", A + "/snapshots/{rid}", None),
    ("GET", A + "/trainingShapes/{rid}", None),
]
WITH_BODY = [r for r in ROUTES if r[2] is not None]
# Bodies for these may get random (possibly valid) values: they address a resource that does not exist.
RANDOM_OK = [r for r in WITH_BODY if "{rid}" in r[1]]
HOSTILE_SEGMENTS = ["..%2F..%2Fescaped", "..%2Fx", "%2E%2E", ".hidden", "a%00b", "x" * 300, "%F0%9F%98%80",
                    "a%5Cb", "-rf", "a%20b", "%ED%A0%80", "..", "a..b"]

_rss0: dict[str, int] = {}


def _path(template: str, account: str = "local", rid: str = "no-such-id") -> str:
    return template.format(account=account, rid=rid)


def test_starts_alive(control_plane: Target) -> None:
    assert_alive(control_plane)
    _rss0["rss"] = control_plane.rss()


def test_escaping_account_is_400_and_creates_nothing(control_plane: Target, tmp_path_factory) -> None:
    body = {"trainingConfig": {"baseModel": "firetitan/nano-qwen3"}}
    answer = call(control_plane, "POST", "/v1/accounts/..%2F..%2Fescaped/rlorTrainerJobs?rlorTrainerJobId=job1",
                  json.dumps(body).encode())
    assert answer.status == 400 and answer.json()["error"]["field"] == "account", answer
    base = tmp_path_factory.getbasetemp()
    assert not [p for pattern in ("escaped", "*/escaped", "*/*/escaped") for p in base.glob(pattern)]
    assert call(control_plane, "GET", "/v1/accounts/local/rlorTrainerJobs").json()["rlorTrainerJobs"] == []


@fz.FUZZ
@given(data=st.data())
def test_hostile_path_names_are_4xx(control_plane: Target, data: st.DataObject) -> None:
    method, template, body = data.draw(st.sampled_from(ROUTES))
    segment = data.draw(st.sampled_from(HOSTILE_SEGMENTS))
    which = data.draw(st.sampled_from(["account", "rid"] if "{rid}" in template else ["account"]))
    path = _path(template, **{which: segment})
    raw = None if body is None else json.dumps(body).encode()
    answer = call(control_plane, method, path, raw)
    assert_answer_names_the_problem(answer, f"{method} {path[:120]}")
    assert 400 <= answer.status < 500, f"{method} {path[:120]} -> {answer.status}"


@fz.FUZZ
@given(data=st.data())
def test_hostile_field_values_are_400(control_plane: Target, data: st.DataObject) -> None:
    method, template, body = data.draw(st.sampled_from(WITH_BODY))
    assert body is not None
    field = data.draw(st.sampled_from(fields_of(body)))
    raw = data.draw(st.sampled_from(fz.HOSTILE_RAW))
    answer = call(control_plane, method, _path(template), body_with(body, field, raw))
    assert_answer_names_the_problem(answer, f"{method} {template} {field}={raw[:40]}")
    assert 400 <= answer.status < 500


@fz.FUZZ
@given(data=st.data())
def test_malformed_bodies_are_4xx(control_plane: Target, data: st.DataObject) -> None:
    method, template, _ = data.draw(st.sampled_from([r for r in WITH_BODY if "{rid}" not in r[1]]))
    raw, ctype = data.draw(st.sampled_from(fz.HOSTILE_BODIES))
    answer = call(control_plane, method, _path(template), raw, content_type=ctype)
    assert_answer_names_the_problem(answer, f"{method} {template} body={raw[:40]!r} type={ctype}")
    assert 400 <= answer.status < 500


@fz.FUZZ
@given(data=st.data())
def test_random_field_values_never_500(control_plane: Target, data: st.DataObject) -> None:
    method, template, body = data.draw(st.sampled_from(RANDOM_OK))
    assert body is not None
    field = data.draw(st.sampled_from(fields_of(body)))
    value = data.draw(fz.json_values)
    answer = call(control_plane, method, _path(template), body_with(body, field, json.dumps(value)))
    assert_answer_names_the_problem(answer, f"{method} {template} {field}={value!r:.60}")


@fz.FUZZ
@given(name=st.text(min_size=1, max_size=80))
def test_random_ids_never_500(control_plane: Target, name: str) -> None:
    path = f"/v1/accounts/local/deployments/{quote(name, safe='')}"
    answer = call(control_plane, "GET", path)
    assert_answer_names_the_problem(answer, f"GET {path[:120]}")
    assert answer.status in (400, 404), (path, answer)


def test_still_alive_and_bounded(control_plane: Target) -> None:
    assert_alive(control_plane)
    assert control_plane.rss() - _rss0["rss"] < fz.RSS_GROWTH_BOUND_BYTES
    assert call(control_plane, "GET", "/v1/accounts/local/rlorTrainerJobs").json()["rlorTrainerJobs"] == []
    assert call(control_plane, "GET", "/v1/accounts/local/deployments").json()["deployments"] == []
