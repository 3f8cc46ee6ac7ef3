"""Fuzz the deployment worker's HTTP API with malformed requests: 4xx naming the problem, alive, bounded RSS."""

from __future__ import annotations

import json

import fuzz_http as fz
import pytest
from fuzz_http import Target, assert_alive, assert_answer_names_the_problem, body_with, call, fields_of
from hypothesis import given
from hypothesis import strategies as st

COMPLETION = {"prompt": [1, 2, 3], "max_tokens": 1, "temperature": 1.0, "top_p": 1.0, "n": 1, "seed": 1,
              "stop": ["x"], "logprobs": False}
ROUTES: dict[str, dict] = {
    "/inference/v1/completions": COMPLETION,
    "/v1/completions": COMPLETION,
    "/hot_load/v1/models/hot_load": {"identity": "no-such-snapshot", "mode": "SYNC",
                                     "incremental_snapshot_metadata": {"previous_snapshot_identity": "nope"}},
}
# Random values for these would ask for real work (long generations, many choices): hostile values only.
COSTLY = {"max_tokens", "n", "top_logprobs"}

_rss0: dict[str, int] = {}


def test_starts_alive(deployment: Target) -> None:
    assert_alive(deployment)
    ok = call(deployment, "POST", "/v1/completions", json.dumps(COMPLETION).encode())
    assert ok.status == 200, ok  # the template itself is served: the fuzz below perturbs a valid request
    _rss0["rss"] = deployment.rss()


@fz.FUZZ
@given(data=st.data())
def test_hostile_field_values_are_400(deployment: Target, data: st.DataObject) -> None:
    route = data.draw(st.sampled_from(sorted(ROUTES)))
    field = data.draw(st.sampled_from(fields_of(ROUTES[route])))
    raw = data.draw(st.sampled_from(fz.HOSTILE_RAW))
    answer = call(deployment, "POST", route, body_with(ROUTES[route], field, raw))
    assert_answer_names_the_problem(answer, f"{route} {field}={raw[:40]}")
    assert 400 <= answer.status < 500


@fz.FUZZ
@given(data=st.data())
def test_malformed_bodies_are_4xx(deployment: Target, data: st.DataObject) -> None:
    route = data.draw(st.sampled_from(sorted(ROUTES)))
    raw, ctype = data.draw(st.sampled_from(fz.HOSTILE_BODIES))
    answer = call(deployment, "POST", route, raw, content_type=ctype)
    assert_answer_names_the_problem(answer, f"{route} body={raw[:40]!r} type={ctype}")
    assert 400 <= answer.status < 500


@fz.FUZZ
@given(data=st.data())
def test_random_field_values_never_500(deployment: Target, data: st.DataObject) -> None:
    route = data.draw(st.sampled_from(sorted(ROUTES)))
    field = data.draw(st.sampled_from([f for f in fields_of(ROUTES[route]) if f not in COSTLY]))
    value = data.draw(fz.json_values)
    answer = call(deployment, "POST", route, body_with(ROUTES[route], field, json.dumps(value)))
    assert_answer_names_the_problem(answer, f"{route} {field}={value!r:.60}")


def test_still_alive_and_bounded(deployment: Target) -> None:
    assert_alive(deployment)
    assert deployment.rss() - _rss0["rss"] < fz.RSS_GROWTH_BOUND_BYTES


# Issue 14 (12, 21, 22): loose types and unbounded sizes the deployment's schema must refuse with a 400
# naming the field (strict CompletionBody). `now` would name a known gap as a strict xfail; none is left.
def _loose(body: dict, now: str | None) -> object:
    marks = [pytest.mark.xfail(strict=True, reason="deployment schema (issue 14): " + now)] if now else []
    return pytest.param({**COMPLETION, **body}, id=json.dumps(body)[:40], marks=marks)


LOOSE = [
    _loose({"max_tokens": True}, None),
    _loose({"temperature": True}, None),
    _loose({"n": "2"}, None),
    _loose({"seed": 2**64}, None),
    _loose({"prompt": [1, 10**20]}, None),
    _loose({"prompt": "a\ud800b"}, None),
]


@pytest.mark.parametrize("body", LOOSE)
def test_loose_types_are_refused(deployment: Target, body: dict) -> None:
    raw = json.dumps(body).encode()  # json.dumps escapes a lone surrogate as \ud800, as a client would
    answer = call(deployment, "POST", "/v1/completions", raw)
    assert_answer_names_the_problem(answer, str(body)[:80])
    assert answer.status == 400, f"{body} -> {answer.status} {answer.raw[:200]!r}"
